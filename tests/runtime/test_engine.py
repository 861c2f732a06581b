"""The engine end to end on CPU, against the plain dense forward pass with no cache."""

import jax
import numpy as np
import pytest

from models.errors import RequestError
from runtime.engine import Engine, EngineConfig, QueueFullError
from runtime.sampling import SamplingParams
from tests.runtime.conftest import greedy_reference, reference_logits

# A tiny page pool (15 usable pages of 4 tokens = 60 tokens, one max_seq_len request) and a 16-token
# step budget force chunked prefill and preemption.
TIGHT = EngineConfig(page_size=4, kv_cache_bytes=16 * 2 * 2 * 4 * 2 * 8 * 4, max_seq_len=60,
                     max_num_seqs=4, max_num_batched_tokens=16, max_prefill_chunk=16)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine(tiny_ckpt, TIGHT)


def test_correct_under_load_with_chunking_and_preemption(engine, tiny_ckpt):
    assert engine.blocks.num_usable == 15
    rng = np.random.default_rng(0)
    lengths = [1, 3, 17, 33, 50, 5, 24, 29]
    prompts = [rng.integers(0, 260, n).tolist() for n in lengths]
    news = [12, 20, 9, 8, 6, 16, 10, 14]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in news]
    chunks, preempted = [], []
    real_schedule = engine.scheduler.schedule

    def spy(now):
        plan = real_schedule(now)
        chunks.extend(c for c in plan.prefills if c.start > 0)
        preempted.extend(plan.preempted)
        return plan

    engine.scheduler.schedule = spy
    try:
        out = engine.generate(prompts, params)
    finally:
        del engine.scheduler.schedule
    assert chunks and preempted, "the test must exercise chunked prefill and preemption"
    for prompt, n, completion in zip(prompts, news, out):
        assert list(completion.token_ids) == greedy_reference(tiny_ckpt, prompt, n)
        assert completion.finish_reason == "length"
    assert engine.blocks.num_free == engine.blocks.num_usable


def test_no_compiles_after_warm_up(engine):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    mixed = [
        ("hello there", SamplingParams(max_tokens=5)),
        ([5, 6, 7] * 7, SamplingParams(max_tokens=9, temperature=0.8, top_k=5, seed=1)),
        ("the theory", SamplingParams(max_tokens=7, temperature=1.3, top_p=0.7, min_p=0.1, seed=2)),
        ([1], SamplingParams(max_tokens=4, repetition_penalty=1.3, presence_penalty=0.5,
                             frequency_penalty=0.2, logprobs=3)),
        ("in an inn", SamplingParams(max_tokens=6, stop=("nn",), stop_token_ids=(5,), logprobs=0)),
    ]
    engine.generate([p for p, _ in mixed], [s for _, s in mixed])  # warm-up
    before = len(compiles)
    for round_ in range(3):
        engine.generate([p for p, _ in mixed][round_:] + ["x" * (round_ + 3)],
                        [s for _, s in mixed][round_:] + [SamplingParams(max_tokens=3, temperature=0.5)])
    assert len(compiles) == before


def test_kv_pool_is_donated_not_copied(engine):
    pool_bytes = engine.pool.nbytes
    for program in engine.programs.compiled.values():
        stats = program.memory_analysis()
        assert stats.alias_size_in_bytes >= pool_bytes
    old = engine.pool
    engine.generate(["ab"], SamplingParams(max_tokens=2))
    assert all(a.is_deleted() for a in old.k + old.v)  # the buffers were handed over, not copied


def test_no_leaks_after_hundreds_of_requests_with_aborts(engine):
    rng = np.random.default_rng(1)
    submitted = 0
    while submitted < 300 or engine.has_unfinished:
        while submitted < 300 and len(engine.scheduler.waiting) < 8:
            n = int(rng.integers(1, 32))  # + max_tokens: within the 60-token context
            engine.add_request(rng.integers(0, 260, n).tolist(),
                               SamplingParams(max_tokens=int(rng.integers(1, 30)),
                                              temperature=float(rng.choice([0, 1])), seed=submitted),
                               request_id=f"r{submitted}", priority=int(rng.integers(0, 3)))
            submitted += 1
        engine.step()
        live = list(engine._requests)
        for rid in live:
            if rng.random() < 0.03:
                assert engine.abort(rid)
    assert engine.blocks.num_free == engine.blocks.num_usable
    assert all(engine.blocks.ref_count(p) == 0 for p in range(engine.blocks.num_pages))
    assert engine.scheduler.num_unfinished == 0


@pytest.mark.parametrize("prompt,params,priority,message", [
    ("", SamplingParams(), 0, "prompt is empty"),
    ([], SamplingParams(), 0, "prompt is empty"),
    ([1] * 60, SamplingParams(), 0, "does not fit the context of 60"),
    ([1] * 40, SamplingParams(max_tokens=21), 0, "max_tokens: prompt .* exceeds the context"),
    ([1], SamplingParams(max_tokens=0), 0, "max_tokens must be a positive integer"),
    ([1], SamplingParams(temperature=-1), 0, "temperature must be >= 0"),
    ([1], SamplingParams(top_p=0), 0, r"top_p must be in \(0, 1\]"),
    ([1], SamplingParams(top_p=1.01), 0, r"top_p must be in \(0, 1\]"),
    ([1], SamplingParams(top_k=-1), 0, "top_k must be >= 0"),
    ([1], SamplingParams(stop_token_ids=(300,)), 0, "stop_token_ids: 300 is outside the vocabulary"),
    ([1, 999], SamplingParams(), 0, "prompt token id 999 is outside the vocabulary"),
    ([1], SamplingParams(logprobs=21), 0, "logprobs must be in"),
    ([1], SamplingParams(max_tokens=4), 3, r"priority must be in \[0, 3\)"),
])
def test_bad_requests_are_named_and_others_go_on(engine, tiny_ckpt, prompt, params, priority, message):
    good = engine.add_request([3, 4, 5], SamplingParams(max_tokens=6, ignore_eos=True))
    with pytest.raises(RequestError, match=message):
        engine.add_request(prompt, params, priority=priority)
    outs = []
    while engine.has_unfinished:
        outs += [o for o in engine.step() if o.request_id == good]
    assert [t for o in outs for t in o.token_ids] == greedy_reference(tiny_ckpt, [3, 4, 5], 6)


def test_full_queue_and_queue_timeout(tiny_ckpt):
    import dataclasses
    import time

    engine = Engine(tiny_ckpt, dataclasses.replace(TIGHT, max_queue_size=2, queue_timeout_s=0.05,
                                                    max_num_seqs=1))
    a = engine.add_request([1, 2], SamplingParams(max_tokens=40, ignore_eos=True))
    b = engine.add_request([3, 4], SamplingParams(max_tokens=2, ignore_eos=True))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        engine.add_request([5], SamplingParams(max_tokens=2))
    engine.step()  # a runs; b waits behind it (one running request at most)
    time.sleep(0.1)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[b].finished and outs[b].finish_reason == "rejected" and "queue timeout" in outs[b].error
    while engine.has_unfinished:
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_usable and a
    # a per-request timeout overrides the configured one
    engine.add_request([1, 2], SamplingParams(max_tokens=30, ignore_eos=True))
    c = engine.add_request([3], SamplingParams(max_tokens=2), queue_timeout_s=0.01)
    engine.step()
    time.sleep(0.03)
    assert any(o.request_id == c and o.finish_reason == "rejected" for o in engine.step())
    with pytest.raises(RequestError, match="queue_timeout_s must be positive"):
        engine.add_request([3], SamplingParams(max_tokens=2), queue_timeout_s=0)
    while engine.has_unfinished:
        engine.step()


def test_seeded_sampling_ignores_batch_company(engine):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = engine.generate([[9, 8, 7]], p)[0].token_ids
    crowd = engine.generate([[1, 2], [9, 8, 7], [3] * 20],
                            [SamplingParams(max_tokens=8, temperature=1.0), p, SamplingParams(max_tokens=5)])
    assert crowd[1].token_ids == alone
    other = engine.generate([[9, 8, 7]], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=43,
                                                        ignore_eos=True))[0].token_ids
    assert other != alone


def test_penalties_match_a_host_reference(tiny_ckpt):
    import dataclasses

    import jax

    # weights at a twentieth of the shared fixture's, so logits are small enough for penalties to bite
    tiny_ckpt = dataclasses.replace(tiny_ckpt, params=jax.tree.map(
        lambda a: a / 20 if a.ndim > 1 else a, tiny_ckpt.params))
    engine = Engine(tiny_ckpt, dataclasses.replace(TIGHT, decode_buckets=(1,), prefill_buckets=(16,)))
    prompt, n = [10, 11, 10, 12], 10
    # a negative presence penalty pulls seen tokens up, so the penalties visibly steer greedy
    p = SamplingParams(max_tokens=n, repetition_penalty=1.5, presence_penalty=-1.5, frequency_penalty=0.4,
                       ignore_eos=True)
    ids = list(prompt)
    for _ in range(n):
        logits = reference_logits(tiny_ckpt, ids)
        seen = np.zeros_like(logits, bool)
        seen[ids] = True
        counts = np.bincount(ids[len(prompt):], minlength=logits.size).astype(np.float32)
        logits = np.where(seen, np.where(logits > 0, logits / 1.5, logits * 1.5), logits)
        logits = logits + 1.5 * (counts > 0) - 0.4 * counts
        ids.append(int(logits.argmax()))
    assert list(engine.generate([prompt], p)[0].token_ids) == ids[len(prompt):]
    assert ids[len(prompt):] != greedy_reference(tiny_ckpt, prompt, n)  # the penalties mattered


def test_logprobs_are_the_models_own(engine, tiny_ckpt):
    prompt = [20, 21, 22]
    out = engine.generate([prompt], SamplingParams(max_tokens=3, logprobs=4, ignore_eos=True))[0]
    assert len(out.logprobs) == 3
    ids = list(prompt)
    for lp in out.logprobs:
        logits = reference_logits(tiny_ckpt, ids).astype(np.float64)
        ref = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        assert lp.logprob == pytest.approx(ref[lp.token_id], abs=1e-4)
        assert [t for t, _ in lp.top] == list(np.argsort(-ref)[:4])
        assert lp.top[0][0] == lp.token_id  # greedy: the best is the chosen one
        ids.append(lp.token_id)


def test_stop_strings_stop_tokens_and_eos(engine, tiny_ckpt):
    prompt = [30, 31, 32]
    ref = greedy_reference(tiny_ckpt, prompt, 12)
    full = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert list(full.token_ids) == ref
    # a stop token ends the output before it
    cut = engine.generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=(ref[4],), ignore_eos=True))[0]
    assert list(cut.token_ids) == ref[:ref.index(ref[4])] and cut.finish_reason == "stop"
    # a stop string: the text ends right before it, whichever tokens it spans
    text = full.text
    if len(text) >= 4:
        stop = text[2:4]
        out = engine.generate([prompt], SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))[0]
        assert out.text == text[:text.index(stop)] and out.finish_reason == "stop"
    # the tokenizer's EOS ends generation unless ignore_eos
    eos = tiny_ckpt.tokenizer.eos_ids[0]
    steered = engine.generate([prompt], SamplingParams(max_tokens=12, logprobs=0))[0]
    assert eos not in steered.token_ids


def test_priority_is_served_first(tiny_ckpt):
    import dataclasses

    engine = Engine(tiny_ckpt, dataclasses.replace(TIGHT, max_num_seqs=1))
    finished = []
    engine.add_request([1, 2], SamplingParams(max_tokens=3, ignore_eos=True), request_id="first")
    engine.step()
    engine.add_request([1, 2], SamplingParams(max_tokens=3, ignore_eos=True), request_id="low", priority=2)
    engine.add_request([1, 2], SamplingParams(max_tokens=3, ignore_eos=True), request_id="high", priority=0)
    while engine.has_unfinished:
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["first", "high", "low"]
