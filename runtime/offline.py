"""Offline generation: the engine driven to completion over a list of prompts (Engine.generate),
the queue fed as space frees, the outputs gathered per prompt, in order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence as Seq

from meshserve.models.errors import RequestError
from meshserve.runtime.outputs import Completion
from meshserve.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from meshserve.runtime.engine import Engine


def generate(engine: "Engine", prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams],
             on_output=None) -> list[Completion]:
    params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(params_list) != len(prompts):
        raise RequestError("one SamplingParams per prompt, or one for all")
    todo = list(enumerate(prompts))
    ids: dict[str, int] = {}
    done: dict[int, Completion] = {}
    prompt_ids, tokens, texts, logprobs = {}, {}, {}, {}
    while todo or engine.has_unfinished:
        while todo and engine.outputs.num_queued() < engine.config.max_queue_size:
            i, prompt = todo.pop(0)
            rid = engine.add_request(prompt, params_list[i])
            ids[rid] = i
            prompt_ids[i] = tuple(engine.outputs.requests[rid].seq.tokens)
            tokens[i], texts[i], logprobs[i] = [], [], []
        for out in engine.step():
            if out.request_id not in ids:
                continue
            i = ids[out.request_id]
            tokens[i].extend(out.token_ids)
            texts[i].append(out.text)
            logprobs[i].extend(out.logprobs)
            if on_output is not None:
                on_output(out)
            if out.finished:
                done[i] = Completion(out.request_id, prompt_ids[i], tuple(tokens[i]),
                                     "".join(texts[i]), out.finish_reason, tuple(logprobs[i]))
    return [done[i] for i in range(len(prompts))]
