"""meshserve workers behind NVIDIA Dynamo's own frontend and KV router, as real processes on loopback
(file discovery, TCP request plane, ZMQ events: no etcd, no NATS), asked by the real `openai` client.

One fleet for the module, in this order: two workers answer; requests sharing a prefix land on the
worker holding it; 100 cancelled streams leave every page free; a worker SIGKILLed mid-stream loses
nothing (the frontend migrates the request, greedy output unchanged); a third worker joins and takes
requests; a SIGTERMed worker finishes what it has, takes nothing new and exits 0; a worker of another
model registers beside them and gets that model's requests alone, and so does a worker of a mixture of
experts (Qwen3-MoE).
"""

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from meshserve.models.errors import MeshserveError
from meshserve.serving.fleet import LocalFleet, free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
PREFIX = "tenant seven shares this long system context with every user of it. " * 2


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Fleet(LocalFleet):
    """The module's fleet: the tiny model, a small pool, every worker with its metrics port."""

    def __init__(self, tmp: Path, model_dir: Path):
        super().__init__(tmp, free_port(), "kv", migration_limit=3, env={"DYN_LOG": "warn"})
        config = yaml.safe_load((ROOT / "configs/serving/default.yaml").read_text())
        config["engine"].update(max_seq_len=512, max_num_seqs=8, max_num_batched_tokens=256, max_prefill_chunk=256,
                                prefill_tokens_while_decoding=None, kv_cache_bytes=2**20, host_kv_bytes=0,
                                compilation_cache_dir=str(tmp / "xla"))
        config["server"].update(drain_timeout_s=60)
        (tmp / "serving.yaml").write_text(yaml.safe_dump(config))
        self.tmp, self.model_dir = tmp, model_dir
        self.system_ports: dict[str, int] = {}
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.http_port}/v1", api_key="none",
                                    max_retries=0, timeout=120)

    def add_worker(self, name: str, model: str = MODEL, *more: str, env=None, wait=True, model_dir=None) -> None:
        self.system_ports[name] = system = free_port(below=2**15)  # Dynamo's own /health of the worker
        env = {"DYN_SYSTEM_PORT": str(system), "DYN_HEALTH_CHECK_ENABLED": "true", **(env or {})}
        self.start_worker(name, ["--model", str(model_dir or self.model_dir), "--config", str(self.tmp / "serving.yaml"),
                                 "--model-name", model, *more], timeout=240, env=env, wait=wait, metrics=True)

    def prompt_tokens(self) -> dict[str, float]:
        return {w: self.metric(w, "meshserve_prompt_tokens_total") for w, p in self.workers.items()
                if p.poll() is None}

    def spread(self, n: int = 8) -> None:
        """n concurrent requests: the router spreads them over the workers by load."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda i: complete(self, f"spread {i} {random.random()}", 24), range(n)))


@pytest.fixture(scope="module")
def fleet(tiny_ckpt_dir, tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), tiny_ckpt_dir)
    try:
        fleet.add_worker("a")
        fleet.add_worker("b")
        wait_for(lambda: [m.id for m in fleet.client.models.list().data] == [MODEL], 60, "the model to be listed")
        fleet.spread()
        assert all(n > 0 for n in fleet.prompt_tokens().values()), "the frontend must route to both workers"
        yield fleet
    finally:
        fleet.stop()


def complete(fleet, prompt: str, n: int, **kw):
    return fleet.client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                           extra_body={"ignore_eos": True}, **kw)


def test_completions_and_chat_through_the_frontend(fleet):
    out = complete(fleet, "hello there", 12)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 12
    assert complete(fleet, "hello there", 12).choices[0].text == out.choices[0].text  # greedy: the same
    chat = fleet.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               for t in chat.choices[0].logprobs.content)
    streamed = complete(fleet, "hello there", 12, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_structured_output_through_the_frontend(fleet):
    """Dynamo's frontend turns response_format and guided_regex into guided_decoding; the worker
    enforces it (a random-weight model at temperature 1: valid only because the grammar held it)."""
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "ok": {"type": "boolean"}, "tag": {"enum": ["red", "green"]}},
              "required": ["n", "ok", "tag"], "additionalProperties": False}
    messages = [{"role": "user", "content": "hi"}]
    for seed in range(3):
        out = fleet.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=200, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
        assert out.choices[0].finish_reason == "stop"
    out = fleet.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=1.0,
                                               seed=1, extra_body={"guided_regex": "[a-z]{3}-[0-9]{3}"})
    assert re.fullmatch("[a-z]{3}-[0-9]{3}", out.choices[0].message.content, re.ASCII)


def test_the_frontend_answers_what_a_worker_cannot_honour_with_a_400_naming_it(fleet):
    """Through Dynamo's real frontend: n > 1, a schema keyword the worker cannot enforce and an
    over-long prompt are 400s with the worker's message, not silently ignored or a bare "Invalid
    request"."""
    messages = [{"role": "user", "content": "hi"}]
    bad = {"type": "object", "properties": {"a": {"type": "object", "dependentSchemas": {"b": {}}}}}
    cases = [(dict(n=2), "n=2: a meshserve Dynamo worker returns one choice per request"),
             (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}),
              "cannot enforce: /properties/a/dependentSchemas")]
    for kw, message in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            fleet.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **kw)
        assert message in str(refused.value)
    with pytest.raises(openai.BadRequestError, match="does not fit the context of 512 tokens"):
        complete(fleet, "hi " * 600, 4)


def test_dynamo_health_checks_the_workers(fleet):
    """Dynamo's system server says ready once a worker answered; idle, Dynamo sends its canary (the
    worker's health_check_payload: one greedy token) and the worker answers it too."""
    def health(worker):
        with urllib.request.urlopen(f"http://127.0.0.1:{fleet.system_ports[worker]}/health", timeout=5) as r:
            return r.status, r.read().decode()

    for worker in ("a", "b"):
        status, body = health(worker)
        assert status == 200 and "ready" in body, body
    before = {w: fleet.metric(w, 'meshserve_requests_total{outcome="length"}') for w in ("a", "b")}
    wait_for(lambda: all(fleet.metric(w, 'meshserve_requests_total{outcome="length"}') > before[w] for w in before),
             40, "Dynamo's canary requests")
    assert all(health(w)[0] == 200 for w in ("a", "b"))


def test_requests_sharing_a_prefix_land_on_the_worker_that_holds_it(fleet):
    before = fleet.prompt_tokens()
    first = complete(fleet, PREFIX + "question 0?", 2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    after_first = fleet.prompt_tokens()
    holder = max(after_first, key=lambda w: after_first[w] - before[w])
    cached = []
    for i in range(1, 7):
        out = complete(fleet, PREFIX + f"question {i}?", 2)
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
    after = fleet.prompt_tokens()
    grown = {w: after[w] - after_first[w] for w in after}
    assert grown[holder] == 6 * first.usage.prompt_tokens, grown  # every one of them went to the holder
    assert all(c >= (first.usage.prompt_tokens // 16 - 1) * 16 for c in cached), cached  # and hit its cache


def test_cancelled_streams_free_every_page(fleet):
    """100 streams closed by their clients after a few chunks: every page is freed. Most are aborted
    on their worker (400 tokens asked, so a stream cannot finish before its client's close arrives);
    how many depends on when Dynamo's frontend notices a closed connection (44 to 99 of 100 seen)."""
    async def one(client, rng):
        stream = await client.completions.create(model=MODEL, prompt=f"stream {rng.random()}", max_tokens=400,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        stop_after = rng.randrange(0, 8)
        async for i, _ in aenumerate(stream):
            if i >= stop_after:
                break
        await stream.close()

    async def main():
        rng = random.Random(0)
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{fleet.http_port}/v1", api_key="none",
                                      max_retries=0, timeout=120) as client:
            await asyncio.gather(*(one(client, rng) for _ in range(100)))

    asyncio.run(main())
    for worker in fleet.workers:
        wait_for(lambda: fleet.metric(worker, "meshserve_requests_running") == 0
                 and fleet.metric(worker, "meshserve_kv_pages_used") == 0, 60, f"worker {worker} to free its pages")
    assert sum(fleet.metric(w, 'meshserve_requests_total{outcome="abort"}') for w in fleet.workers) > 25


async def aenumerate(stream):
    i = 0
    async for item in stream:
        yield i, item
        i += 1


def holder_of(fleet, prompt: str, n: int) -> tuple[str, str]:
    """Ask once (greedy); returns the worker that answered, which now holds the prompt's pages (the
    router sends the same prompt back to it), and the answer."""
    before = fleet.prompt_tokens()
    text = complete(fleet, prompt, n).choices[0].text
    after = fleet.prompt_tokens()
    return max(after, key=lambda w: after[w] - before.get(w, 0)), text


def test_a_killed_worker_loses_no_request(fleet, capsys):
    prompt = PREFIX + "migrate me please"
    holder, want = holder_of(fleet, prompt, 200)
    stream = complete(fleet, prompt, 200, stream=True, stream_options={"include_usage": True})
    text = []
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].text)
        if len(text) == 10 and fleet.workers[holder].poll() is None:
            fleet.workers[holder].send_signal(signal.SIGKILL)
        usage = chunk.usage
    assert fleet.workers[holder].wait(timeout=10) == -signal.SIGKILL
    assert "disconnected" in (fleet.tmp / "frontend.log").read_text()  # the frontend did migrate it
    assert "".join(text) == want  # greedy: the other worker continued exactly
    assert usage.completion_tokens == 200
    # what `meshserve fleet` watches: the exit is named once, and the fleet serves on
    assert fleet.check() == [holder] and fleet.check() == []
    assert f"meshserve fleet: {holder} exited with code -9" in capsys.readouterr().err
    assert complete(fleet, "after the kill", 3).usage.completion_tokens == 3


def test_a_worker_joins_and_another_leaves_on_sigterm(fleet):
    fleet.add_worker("c")
    wait_for(lambda: fleet.spread() or fleet.prompt_tokens().get("c", 0) > 0, 60, "the new worker to take requests")
    prompt = PREFIX + "leave gently"
    leaving, want = holder_of(fleet, prompt, 200)
    stream = complete(fleet, prompt, 200, stream=True)
    text = []
    for chunk in stream:
        text.append(chunk.choices[0].text if chunk.choices else "")
        if len(text) == 5:
            fleet.workers[leaving].send_signal(signal.SIGTERM)
    assert "".join(text) == want  # finished on the worker that was leaving
    assert fleet.workers[leaving].wait(timeout=60) == 0
    before = fleet.prompt_tokens()  # the workers left
    outs = [complete(fleet, f"after {i}", 3) for i in range(4)]
    after = fleet.prompt_tokens()
    assert leaving not in after and sum(after.values()) - sum(before.values()) == sum(o.usage.prompt_tokens for o in outs)


def test_workers_of_another_model_serve_it_beside(fleet):
    fleet.add_worker("other", "tiny-b", "--component", "other")  # one model per endpoint
    wait_for(lambda: sorted(m.id for m in fleet.client.models.list().data) == [MODEL, "tiny-b"], 60,
             "both models to be listed")
    before = fleet.prompt_tokens()
    out = fleet.client.completions.create(model="tiny-b", prompt="to the other model", max_tokens=3, temperature=0)
    after = fleet.prompt_tokens()
    assert out.model == "tiny-b" and {w for w in after if after[w] > before.get(w, 0)} == {"other"}
    with pytest.raises(openai.NotFoundError):
        fleet.client.completions.create(model="tiny-c", prompt="nobody serves this", max_tokens=3)
    fleet.workers["other"].send_signal(signal.SIGTERM)  # one process fewer for the later tests' machine
    assert fleet.workers["other"].wait(timeout=60) == 0


def test_a_speculating_worker_gives_the_same_text_and_counts_its_drafts(fleet):
    """A worker with n-gram speculation (`--speculative-config`) behind Dynamo's frontend: the greedy
    text of a worker without it, and its drafts on its /metrics."""
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    fleet.add_worker("spec", "tiny-spec", "--component", "spec", "--speculative-config", spec)
    wait_for(lambda: "tiny-spec" in [m.id for m in fleet.client.models.list().data], 60, "the model to be listed")
    for prompt in ("abc abc abc abc", "to be or not to be, to be or"):
        out = fleet.client.completions.create(model="tiny-spec", prompt=prompt, max_tokens=20, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert out.choices[0].text == complete(fleet, prompt, 20).choices[0].text
    assert fleet.metric("spec", "meshserve_spec_decode_num_drafts_total") > 0
    fleet.workers["spec"].send_signal(signal.SIGTERM)  # drained and gone: the later tests' fleet as before
    assert fleet.workers["spec"].wait(timeout=60) == 0


def test_a_worker_serves_a_mixture_of_experts(fleet, tmp_path):
    """A Qwen3-MoE checkpoint, converted from a random transformers model, served by a worker through
    Dynamo's frontend: the text of the engine's own greedy tokens for the same prompt, and the router's
    statistics on the worker's /metrics (each layer: its tokens, top-2)."""
    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.convert import convert
    from meshserve.runtime.engine import Engine, EngineConfig
    from meshserve.runtime.sampling import SamplingParams
    from tests.helpers import make_hf_model

    make_hf_model("qwen3_moe", tmp_path / "hf", seed=3)
    folder = convert(f"hf:{tmp_path / 'hf'}", tmp_path / "moe", progress=False)
    fleet.add_worker("moe", "tiny-moe", "--component", "moe", model_dir=folder)
    wait_for(lambda: "tiny-moe" in [m.id for m in fleet.client.models.list().data], 60, "the MoE model to be listed")
    prompt = "experts, route this"
    routed = lambda: [fleet.metric("moe", f'meshserve_moe_expert_tokens_count{{layer="{i}"}}') for i in (0, 1)]
    before = routed()
    out = fleet.client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
    ckpt = load_checkpoint(folder, progress=False)
    ids = ckpt.tokenizer.encode(prompt)
    fed = len(ids) + 15  # the last token sampled is never fed
    wait_for(lambda: [a - b for a, b in zip(routed(), before)] == [2 * fed] * 2, 10, "the router statistics")
    engine = Engine(ckpt, EngineConfig(max_seq_len=128, max_num_seqs=2, max_num_batched_tokens=64,
                                       max_prefill_chunk=64, decode_buckets=(2,), prefill_buckets=(64,)))
    [expected] = engine.generate([ids], SamplingParams(max_tokens=16, ignore_eos=True))
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 16
    assert out.choices[0].text == ckpt.tokenizer.decode(list(expected.token_ids))
    fleet.workers["moe"].send_signal(signal.SIGTERM)
    assert fleet.workers["moe"].wait(timeout=60) == 0


def test_a_worker_of_two_processes_gives_a_single_process_workers_tokens(fleet):
    """One engine over 2 processes × 4 CPU devices (jax.distributed on loopback, tensor=8): process 0
    registers and takes requests, process 1 replays its turns."""
    mesh = fleet.tmp / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"platform": "cpu", "cpu_devices": 4, "axes": {"data": 1, "tensor": 8},
                                    "distributed": {"coordinator_address": f"127.0.0.1:{free_port()}",
                                                    "num_processes": 2, "process_id": "env:MESHSERVE_PROCESS_ID",
                                                    "initialization_timeout_s": 120}}))
    more = ("--component", "mh", "--mesh", str(mesh))
    prompts = ("hello there", "the mesh spans two processes")
    wants = [complete(fleet, prompt, 24).choices[0].text for prompt in prompts]  # before the two start up
    fleet.add_worker("mh1", "tiny-mh", *more, env={"MESHSERVE_PROCESS_ID": "1", "JAX_PLATFORMS": "cpu"}, wait=False)
    fleet.add_worker("mh0", "tiny-mh", *more, env={"MESHSERVE_PROCESS_ID": "0", "JAX_PLATFORMS": "cpu"})
    wait_for(lambda: "tiny-mh" in [m.id for m in fleet.client.models.list().data], 60, "the model to be listed")
    for prompt, want in zip(prompts, wants):
        streamed = fleet.client.completions.create(model="tiny-mh", prompt=prompt, max_tokens=24, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in streamed if c.choices)
        assert fleet.client.completions.create(model="tiny-mh", prompt=prompt, max_tokens=24, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text == want == text
    for name in ("mh0", "mh1"):  # SIGTERM to process 0 stops both
        assert fleet.workers[name].poll() is None
    fleet.workers["mh0"].send_signal(signal.SIGTERM)
    assert fleet.workers["mh0"].wait(timeout=60) == 0 and fleet.workers["mh1"].wait(timeout=60) == 0


def test_the_fleet_stops_when_no_worker_is_left(fleet):
    """Last of the tests on the fleet: with every worker gone, `meshserve fleet` says so and stops."""
    for proc in fleet.workers.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    with pytest.raises(MeshserveError, match="every worker has exited"):
        fleet.check()


# ---- the worker's own logic, no processes ----------------------------------------------------------


def test_a_bad_dynamo_setting_is_one_error_line(tiny_ckpt_dir, tmp_path):
    import subprocess
    import sys

    env = {**__import__("os").environ, "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(tmp_path),
           "DYN_SYSTEM_PORT": "99999", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "worker", "--model", str(tiny_ckpt_dir),
                             "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert lines[-1].startswith("meshserve: error: cannot join Dynamo:") and "SYSTEM_PORT" in lines[-1], result.stderr


def test_dynamo_request_to_sampling_params():
    from meshserve.serving.worker import sampling_params

    request = {"token_ids": [5, 6, 7], "eos_token_ids": [2],
               "stop_conditions": {"max_tokens": 9, "stop": None, "stop_token_ids": [11],
                                   "stop_token_ids_hidden": [2], "min_tokens": 3, "ignore_eos": None},
               "sampling_options": {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": None, "seed": 7,
                                    "presence_penalty": 0.25, "frequency_penalty": None, "repetition_penalty": 1.1},
               "output_options": {"logprobs": 2}}
    p = sampling_params(request, prompt_len=3, max_seq_len=100)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (9, 0.5, 0.9, 40, 0.0, 7)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.25, 0.0, 1.1)
    assert (p.stop_token_ids, p.ignore_eos, p.min_tokens, p.logprobs) == ((2, 11), False, 3, 2)
    assert p.detokenize is False  # token-in/token-out: the frontend detokenizes
    # nothing given: OpenAI's defaults, up to the context; ignore_eos arrives as an empty EOS list
    p = sampling_params({"token_ids": [1] * 30, "eos_token_ids": []}, prompt_len=30, max_seq_len=100)
    assert (p.max_tokens, p.temperature, p.top_k, p.ignore_eos, p.logprobs) == (70, 1.0, 0, True, None)
    # the server's sampling defaults (the model's) fill what the client left unset (null), not what it set
    defaults = {"temperature": 0.0, "top_k": 20}
    p = sampling_params({"sampling_options": {"temperature": None, "top_k": None}}, 3, 100, defaults)
    assert (p.temperature, p.top_k) == (0.0, 20)
    p = sampling_params({"sampling_options": {"temperature": 0.7}}, 3, 100, defaults)
    assert (p.temperature, p.top_k) == (0.7, 20)


@pytest.mark.parametrize("options,message", [
    ({"n": 2}, "n=2: a meshserve Dynamo worker returns one choice per request"),
    ({"best_of": 3}, "best_of=3: a meshserve Dynamo worker"),
])
def test_what_a_worker_cannot_honour_is_refused(options, message):
    from meshserve.models.errors import RequestError
    from meshserve.serving.worker import refuse_unservable

    with pytest.raises(RequestError, match=message):
        refuse_unservable({"sampling_options": options})
    refuse_unservable({"sampling_options": {"n": None, "best_of": 1, "guided_decoding": {"json": {}}}})  # served


def test_guided_decoding_becomes_the_engines_constraint():
    from meshserve.models.errors import RequestError
    from meshserve.runtime.grammar import Guided
    from meshserve.serving.worker import guided

    assert guided({"json": {"type": "object"}, "regex": None, "backend": "xgrammar"}) == Guided("json", '{"type":"object"}')
    assert guided({"json": '{"type": "integer"}'}) == Guided("json", '{"type":"integer"}')
    assert guided({"choice": ["a", "b"]}) == Guided("choice", '["a", "b"]')
    assert (guided({"regex": "a+"}), guided({"grammar": "start: A"}), guided(None)) == (
        Guided("regex", "a+"), Guided("grammar", "start: A"), None)
    for options, message in [({"regex": "a", "choice": ["b"]}, "give one constraint, got choice, regex"),
                             ({"whitespace_pattern": " "}, "whitespace_pattern not supported"),
                             ({"choice": []}, "non-empty list")]:
        with pytest.raises(RequestError, match=message):
            guided(options)


class Recorder:
    def __init__(self):
        self.calls = []

    def publish_stored(self, **kw):
        self.calls.append(("stored", kw))

    def publish_removed(self, **kw):
        self.calls.append(("removed", kw))


def test_a_page_is_published_while_any_tier_holds_it():
    from meshserve.runtime.kv_tiers import KVEvent
    from meshserve.serving.worker import KVPublisher, signed64

    r0, r1 = Recorder(), Recorder()
    kv = KVPublisher([r0, r1], page_size=2)
    a, b, c = bytes(range(16)), bytes(range(1, 17)), bytes([255] * 16)
    kv.publish([KVEvent(1, "stored", "device", a, None, (1, 2), 1),
                KVEvent(2, "stored", "device", b, a, (3, 4), 1),
                KVEvent(3, "stored", "host", a),  # a copy in a lower tier: nothing new to say
                KVEvent(4, "stored", "store", c),  # tokens unknown (an earlier process's store): not named
                KVEvent(5, "removed", "device", a, replica=1)])  # the host still holds it
    assert r0.calls == []  # replica 0 holds nothing
    assert r1.calls == [("stored", {"token_ids": [1, 2], "num_block_tokens": [2], "block_hashes": [signed64(a)],
                                    "parent_hash": None}),
                        ("stored", {"token_ids": [3, 4], "num_block_tokens": [2], "block_hashes": [signed64(b)],
                                    "parent_hash": signed64(a)})]
    kv.publish([KVEvent(6, "removed", "host", a), KVEvent(7, "removed", "store", c)])
    assert r1.calls[2:] == [("removed", {"block_hashes": [signed64(a)]})] and (kv.stored, kv.removed) == (2, 1)
    assert signed64(bytes([255] * 8)) == -1 and signed64(bytes([1] + [0] * 7)) == 1


def test_meshserve_fleet_serves_under_the_checkpoints_name_and_stops_on_ctrl_c(tiny_ckpt_dir, tmp_path):
    """`meshserve fleet` as a user runs it: the model listed under the name `serve` gives it (the
    checkpoint folder's), answering; Ctrl-C (SIGINT to the terminal's process group) stops every
    process, exit 0, no error line."""
    config = yaml.safe_load((ROOT / "configs/serving/default.yaml").read_text())
    config["engine"].update(max_seq_len=256, max_num_seqs=2, max_num_batched_tokens=64, max_prefill_chunk=64,
                            prefill_buckets=[64], decode_buckets=[2], kv_cache_bytes=2**20, host_kv_bytes=0,
                            compilation_cache_dir=str(tmp_path / "xla"))
    (tmp_path / "serving.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    fleet = subprocess.Popen([sys.executable, "-m", "meshserve.serving.cli", "fleet", "--workers", "1", "--port",
                              str(port), "--model", str(tiny_ckpt_dir), "--config", str(tmp_path / "serving.yaml")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # as a shell runs it: its own process group
    try:
        line = fleet.stdout.readline()
        assert "Ctrl-C stops it" in line and f"serving {tiny_ckpt_dir.name};" in line, (line, fleet.stderr.read()
                                                                                           if not line else "")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        out = client.completions.create(model=tiny_ckpt_dir.name, prompt="hello", max_tokens=3,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
        os.killpg(fleet.pid, signal.SIGINT)
        assert fleet.wait(timeout=90) == 0
        assert "error" not in fleet.stderr.read().lower()
    finally:
        if fleet.poll() is None:  # a failed check: stopped as Ctrl-C stops it (its workers and frontend too,
            os.killpg(fleet.pid, signal.SIGINT)  # which run in sessions of their own), killed if it hangs
            try:
                fleet.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(fleet.pid, signal.SIGKILL)
                fleet.wait()
