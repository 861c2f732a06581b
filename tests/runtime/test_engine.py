"""The engine end to end on CPU, against the plain dense forward pass with no cache."""

import jax
import numpy as np
import pytest

from meshserve.models.errors import RequestError
from meshserve.runtime.engine import Engine, EngineConfig, QueueFullError
from meshserve.runtime.grammar import Guided
from meshserve.runtime.sampling import SamplingParams
from tests.runtime.conftest import greedy_reference, penalized_reference, reference_logits

# A tiny page pool (15 usable pages of 4 tokens = 60 tokens, one max_seq_len request) and a 16-token
# step budget force chunked prefill and preemption.
TIGHT = EngineConfig(page_size=4, kv_cache_bytes=16 * 2 * 2 * 4 * 2 * 8 * 4, max_seq_len=60,
                     max_num_seqs=4, max_num_batched_tokens=16, max_prefill_chunk=16)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine(tiny_ckpt, TIGHT)


def test_correct_under_load_with_chunking_and_preemption(engine, tiny_ckpt):
    assert engine.kv.num_usable == 15
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
    assert engine.kv.num_free == engine.kv.num_usable


def test_no_compiles_after_start_up(tiny_ckpt):
    """Counted from the moment the engine is built: its first use compiles nothing either."""
    engine = Engine(tiny_ckpt, TIGHT)
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
        ([9, 8] * 12, SamplingParams(max_tokens=2, prompt_logprobs=2)),  # prompt scores: no new program
        ("a b", SamplingParams(max_tokens=8, temperature=1.0, guided=Guided("regex", "[0-9]{3}"))),  # a mask
    ]
    for round_ in range(3):
        engine.generate([p for p, _ in mixed][round_:] + ["x" * (round_ + 3)],
                        [s for _, s in mixed][round_:] + [SamplingParams(max_tokens=3, temperature=0.5)])
    assert compiles == []


def test_programs_saved_whole_load_without_tracing_and_stay_correct(tiny_ckpt, tmp_path, monkeypatch, caplog):
    import dataclasses

    from meshserve.runtime import programs

    config = dataclasses.replace(TIGHT, compilation_cache_dir=str(tmp_path / "xla"))
    prompts = ["hello there", [5, 6, 7] * 7]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    first = Engine(tiny_ckpt, config)
    assert not first.programs.loaded
    expected = [c.token_ids for c in first.generate(prompts, params)]
    saved = list((tmp_path / "xla").glob("meshserve-programs-*.pkl"))
    assert len(saved) == 1

    def no_tracing(*args, **kwargs):
        raise AssertionError("a saved program was traced again")

    with monkeypatch.context() as m:
        m.setattr(programs, "abstract_batch", no_tracing)
        again = Engine(tiny_ckpt, config)
    assert again.programs.loaded and len(again.programs) == len(first.programs)
    for program in again.programs.compiled.values():  # still donating the pool
        assert program.memory_analysis().alias_size_in_bytes >= again.pool.nbytes
    assert [c.token_ids for c in again.generate(prompts, params)] == expected
    # other buckets: other programs, another file; a damaged file: compiled again, with a warning
    other = Engine(tiny_ckpt, dataclasses.replace(config, decode_buckets=(1,)))
    assert not other.programs.loaded and len(list((tmp_path / "xla").glob("meshserve-programs-*.pkl"))) == 2
    # its prefill programs are the first set's, and in JAX's cache: they were compiled afresh, since an
    # executable XLA:CPU read back from that cache, saved again, loads but misses functions when it runs
    other_again = Engine(tiny_ckpt, dataclasses.replace(config, decode_buckets=(1,)))
    assert other_again.programs.loaded
    assert [c.token_ids for c in other_again.generate(prompts, params)] == expected
    saved[0].write_bytes(saved[0].read_bytes()[:1000])
    damaged = Engine(tiny_ckpt, config)
    assert not damaged.programs.loaded and "unreadable" in caplog.text
    assert [c.token_ids for c in damaged.generate(prompts, params)] == expected


def test_prefill_calls_larger_than_the_context_in_tokens_still_run(tiny_ckpt):
    """A 64-token prefill bucket over pages that hold 60 tokens (max_seq_len 60): several short
    prompts fill one call; it runs on the largest pages bucket and every output is right."""
    import dataclasses

    engine = Engine(tiny_ckpt, dataclasses.replace(TIGHT, max_num_seqs=8, max_num_batched_tokens=64,
                                                   max_prefill_chunk=64, prefill_buckets=(16, 64)))
    assert ("prefill", engine.buckets.rows(64), 64, 15) in engine.programs.compiled
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 260, 9).tolist() for _ in range(6)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    assert [list(o.token_ids) for o in outs] == [greedy_reference(tiny_ckpt, p, 4) for p in prompts]


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
        live = list(engine.outputs.requests)
        for rid in live:
            if rng.random() < 0.03:
                assert engine.abort(rid)
    assert engine.kv.num_free == engine.kv.num_usable
    assert all(engine.kv.blocks.ref_count(p) == 0 for p in range(engine.kv.blocks.num_pages))
    assert engine.scheduler.num_unfinished == 0


@pytest.mark.parametrize("prompt,params,priority,message", [
    ("", SamplingParams(), 0, "prompt is empty"),
    ([], SamplingParams(), 0, "prompt is empty"),
    ([1] * 61, SamplingParams(), 0, "does not fit the context of 60"),
    ([1] * 40, SamplingParams(max_tokens=22), 0, "max_tokens: prompt .* exceeds the context"),
    ([1], SamplingParams(max_tokens=0), 0, "max_tokens must be a positive integer"),
    ([1], SamplingParams(temperature=-1), 0, "temperature must be >= 0"),
    ([1], SamplingParams(top_p=0), 0, r"top_p must be in \(0, 1\]"),
    ([1], SamplingParams(top_p=1.01), 0, r"top_p must be in \(0, 1\]"),
    ([1], SamplingParams(top_k=-1), 0, r"top_k must be in \[0, 2\*\*31\)"),
    ([1], SamplingParams(stop_token_ids=(300,)), 0, "stop_token_ids: 300 is outside the vocabulary"),
    ([1, 999], SamplingParams(), 0, "prompt token id 999 is outside the vocabulary"),
    ([1], SamplingParams(logprobs=21), 0, "logprobs must be in"),
    ([1], SamplingParams(max_tokens=4), 3, r"priority must be in \[0, 3\)"),
    ([1], SamplingParams(stop=("ab",), detokenize=False), 0, "stop strings need detokenize"),
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
    assert engine.kv.num_free == engine.kv.num_usable and a
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
    want = penalized_reference(tiny_ckpt, prompt, n, 1.5, -1.5, 0.4)
    assert list(engine.generate([prompt], p)[0].token_ids) == want
    assert want != greedy_reference(tiny_ckpt, prompt, n)  # the penalties mattered


def test_a_penalized_long_prompt_runs_beside_another_request(tiny_ckpt):
    """A penalized prompt longer than one prefill chunk (so split over steps) used to fail the
    whole step, and every request in it, while its penalty history was built."""
    import dataclasses

    import jax

    tiny_ckpt = dataclasses.replace(tiny_ckpt, params=jax.tree.map(
        lambda a: a / 20 if a.ndim > 1 else a, tiny_ckpt.params))
    config = EngineConfig(page_size=16, kv_cache_bytes=2**17, max_seq_len=320, max_num_seqs=4,
                          max_num_batched_tokens=64, max_prefill_chunk=64, prefill_buckets=(16, 64),
                          decode_buckets=(2,))  # context buckets of 4, 16 and 20 pages
    engine = Engine(tiny_ckpt, config)
    rng = np.random.default_rng(7)
    long_prompt, short_prompt = rng.integers(0, 260, 300).tolist(), rng.integers(0, 260, 5).tolist()
    penalized = SamplingParams(max_tokens=6, repetition_penalty=1.2, presence_penalty=-1.0,
                               frequency_penalty=0.5, ignore_eos=True)
    plans = []
    real = engine.scheduler.schedule

    def spy(now):
        plans.append(real(now))
        return plans[-1]

    engine.scheduler.schedule = spy
    out = engine.generate([short_prompt, long_prompt], [SamplingParams(max_tokens=12, ignore_eos=True), penalized])
    assert [c.finish_reason for c in out] == ["length", "length"]
    assert list(out[0].token_ids) == greedy_reference(tiny_ckpt, short_prompt, 12)
    assert list(out[1].token_ids) == penalized_reference(tiny_ckpt, long_prompt, 6, 1.2, -1.0, 0.5)
    shared = [p for p in plans if any(c.seq.request_id == out[1].request_id and c.start > 0 for c in p.prefills)
              and any(s.request_id == out[0].request_id for s in p.decodes)]
    assert shared, "a later chunk of the penalized prompt must share a step with the other request"


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
    assert len(text) >= 6, text  # the check below needs text on both sides of the stop string
    stop = text[2:4]
    out = engine.generate([prompt], SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))[0]
    assert out.text == text[:text.index(stop)] and out.finish_reason == "stop"
    assert len(out.token_ids) < len(full.token_ids)


def test_token_ids_only_when_no_text_is_wanted(engine, tiny_ckpt):
    """detokenize=False (a caller that detokenizes itself, like Dynamo's frontend): the same tokens,
    stop ids and finish reasons, and no text."""
    prompt = [30, 31, 32]
    ref = greedy_reference(tiny_ckpt, prompt, 12)
    outs = []
    done = engine.generate([prompt, prompt], [SamplingParams(max_tokens=12, ignore_eos=True, detokenize=False),
                                              SamplingParams(max_tokens=12, stop_token_ids=(ref[4],), ignore_eos=True,
                                                             detokenize=False)], on_output=outs.append)
    assert list(done[0].token_ids) == ref and done[0].finish_reason == "length"
    assert list(done[1].token_ids) == ref[:ref.index(ref[4])] and done[1].finish_reason == "stop"
    assert all(o.text == "" for o in outs) and done[0].text == ""


def test_eos_ends_generation_unless_ignored(engine, tiny_ckpt):
    prompt = [3, 0, 30]  # the model's greedy continuation reaches the tokenizer's EOS at its 6th token
    eos = tiny_ckpt.tokenizer.eos_ids[0]
    ref = greedy_reference(tiny_ckpt, prompt, 12)
    assert ref.index(eos) == 5
    stopped = engine.generate([prompt], SamplingParams(max_tokens=12))[0]
    assert list(stopped.token_ids) == ref[:5] and stopped.finish_reason == "stop"
    ignored = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert list(ignored.token_ids) == ref and ignored.finish_reason == "length"


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


# ---- the failure contract ---------------------------------------------------------------------------


def test_a_pool_that_cannot_hold_one_request_is_a_config_error(tiny_ckpt):
    import dataclasses

    from meshserve.models.errors import ConfigError

    with pytest.raises(ConfigError, match=r"holds 60 tokens per data replica .* fewer than max_seq_len \(128\)"):
        Engine(tiny_ckpt, dataclasses.replace(TIGHT, max_seq_len=128))


@pytest.mark.parametrize("fields,message", [
    (dict(prefill_buckets=(8,)), r"prefill_buckets: the largest \(8\) must be >= max_prefill_chunk \(16\)"),
    (dict(context_buckets=(4, 8)), r"context_buckets: the largest \(8 pages of 4\) must hold max_seq_len"),
    (dict(decode_buckets=(4, 2)), "decode_buckets must be in increasing order"),
    (dict(prefill_buckets=(0, 16)), "prefill_buckets must be positive integers"),
])
def test_buckets_must_cover_the_limits(fields, message):
    import dataclasses

    from meshserve.models.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TIGHT, **fields)


def _fail_sampling_rows_of(monkeypatch, seed: int):
    """Building the sampling rows of any call holding a request with `seed` raises."""
    from meshserve.runtime.sampling import SamplingBatch

    real = SamplingBatch.pack.__func__

    def pack(cls, rows, size, *args):
        if any(r is not None and r[0].seed == seed for r in rows):
            raise RuntimeError("injected fault while building a step")
        return real(cls, rows, size, *args)

    monkeypatch.setattr(SamplingBatch, "pack", classmethod(pack))


def test_a_step_that_fails_before_running_caches_nothing(tiny_ckpt, monkeypatch):
    """A request whose part of a step cannot be built fails alone, before anything runs; the pages
    it was to fill are never found by the next request with its prompt."""
    import dataclasses

    engine = Engine(tiny_ckpt, dataclasses.replace(TIGHT, max_num_batched_tokens=48, max_prefill_chunk=48))
    rng = np.random.default_rng(11)
    prompt, other = rng.integers(0, 260, 37).tolist(), rng.integers(0, 260, 5).tolist()
    _fail_sampling_rows_of(monkeypatch, seed=4242)
    bad = engine.add_request(prompt, SamplingParams(max_tokens=4, seed=4242))
    good = engine.add_request(other, SamplingParams(max_tokens=6, ignore_eos=True))
    outs = {}
    while engine.has_unfinished:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert outs[bad][-1].finish_reason == "error" and "injected fault" in outs[bad][-1].error
    assert [t for o in outs[good] for t in o.token_ids] == greedy_reference(tiny_ckpt, other, 6)
    monkeypatch.undo()
    again = engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert list(again.token_ids) == greedy_reference(tiny_ckpt, prompt, 4)
    assert engine.kv.num_free == engine.kv.num_usable


def test_a_decode_call_that_cannot_be_built_fails_the_request_at_fault_not_the_engine(tiny_ckpt, monkeypatch):
    engine = Engine(tiny_ckpt, TIGHT)
    _fail_sampling_rows_of(monkeypatch, seed=4242)
    a = engine.add_request([7], SamplingParams(max_tokens=4, seed=4242))  # one token: straight to decode
    b = engine.add_request([8], SamplingParams(max_tokens=4, ignore_eos=True))  # in the same decode call
    finished = {}
    while engine.has_unfinished:
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finished[a].finish_reason == "error" and "injected fault" in finished[a].error
    assert finished[b].finish_reason == "length"  # the call was rebuilt without the request at fault
    monkeypatch.undo()
    assert engine.kv.num_free == engine.kv.num_usable


def test_a_call_no_single_request_explains_fails_its_requests_not_the_engine(tiny_ckpt, monkeypatch):
    from meshserve.runtime.sampling import SamplingBatch

    engine = Engine(tiny_ckpt, TIGHT)
    real = SamplingBatch.pack.__func__

    def pack(cls, rows, size, *args):  # only the two requests together cannot be built
        if sum(r is not None for r in rows) > 1:
            raise RuntimeError("injected fault of the pair")
        return real(cls, rows, size, *args)

    monkeypatch.setattr(SamplingBatch, "pack", classmethod(pack))
    a = engine.add_request([7], SamplingParams(max_tokens=4, ignore_eos=True))
    b = engine.add_request([8], SamplingParams(max_tokens=4, ignore_eos=True))
    finished = {}
    while engine.has_unfinished:
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finished[a].finish_reason == finished[b].finish_reason == "error"
    monkeypatch.undo()
    out = engine.generate([[8]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert engine.failed is None and list(out.token_ids) == greedy_reference(tiny_ckpt, [8], 4)
    assert engine.kv.num_free == engine.kv.num_usable


def _fault_after_dispatch(engine, family: str):
    """Every `family` program runs (its pool donated), then raises: a device fault after dispatch."""
    for shape, program in list(engine.programs.compiled.items()):
        if shape[0] == family:
            def faulty(*args, _run=program):
                _run(*args)
                raise RuntimeError("injected device fault")
            engine.programs.compiled[shape] = faulty


def test_a_fault_after_dispatch_is_fatal_and_leaves_no_trace_in_the_store(tiny_ckpt, tmp_path):
    import dataclasses

    from meshserve.runtime.engine import EngineFault

    config = dataclasses.replace(TIGHT, kv_store=str(tmp_path / "kv"))
    engine = Engine(tiny_ckpt, config)
    rng = np.random.default_rng(12)
    prompt = rng.integers(0, 260, 30).tolist()
    engine.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=2))
    cached = engine.kv.num_cached
    _fault_after_dispatch(engine, "prefill")
    engine.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(EngineFault, match="injected device fault"):
        engine.step()
    assert engine.kv.num_cached == cached  # the failed plan registered nothing
    for call in (engine.step, engine.persist_prefix_cache, lambda: engine.add_request([1], SamplingParams())):
        with pytest.raises(EngineFault, match="the engine failed"):
            call()
    restarted = Engine(tiny_ckpt, config)  # what a supervisor does
    assert list(restarted.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) \
        == greedy_reference(tiny_ckpt, prompt, 4)
    assert restarted.stats()["store_hit_pages"] == 0


def test_request_limits_are_named(engine):
    from meshserve.runtime.request import RequestLimits

    assert engine.config.limits == RequestLimits()
    cases = [(SamplingParams(stop=tuple(f"s{i}" for i in range(10_000))), r"stop: 10000 stop strings, at most 16"),
             (SamplingParams(stop=("x" * 5000,)), "stop: a stop string of 5000 characters, at most 1024"),
             (SamplingParams(stop_token_ids=tuple(range(257))), "stop_token_ids: 257 ids, at most 256"),
             (SamplingParams(temperature=float("inf")), "temperature must be a finite number"),
             (SamplingParams(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
             (SamplingParams(top_p=float("nan")), "top_p must be a finite number")]
    for params, message in cases:
        with pytest.raises(RequestError, match=message):
            engine.add_request([1, 2], params)
    assert not engine.has_unfinished


def test_requests_without_a_seed_get_one_from_the_engine_and_their_id(engine):
    """Reproducible across the processes of one mesh, which agree on the engine's base seed."""
    p = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    a = engine.add_request([4, 5], p, request_id="same-id")
    seed = engine.outputs.requests[a].seed
    engine.abort(a)
    b = engine.add_request([4, 5], p, request_id="same-id")
    assert engine.outputs.requests[b].seed == seed
    c = engine.add_request([4, 5], p, request_id="other-id")
    assert engine.outputs.requests[c].seed != seed
    engine.abort(b), engine.abort(c)


# ---- prompt scoring and several samples of one prompt ------------------------------------------------


def test_prompt_scores_equal_the_dense_reference(engine, tiny_ckpt):
    """Scores of every prompt token, computed chunk by chunk (16 tokens here), beside a request that
    asks for none."""
    from meshserve.models.decoder import forward

    prompt = np.random.default_rng(8).integers(0, 260, 41).tolist()
    out = engine.generate([prompt, [5, 6, 7]], [SamplingParams(max_tokens=3, prompt_logprobs=3, ignore_eos=True),
                                               SamplingParams(max_tokens=3, ignore_eos=True)])
    logits, _ = jax.jit(forward, static_argnames="config")(
        tiny_ckpt.params, np.asarray([prompt], np.int32), np.arange(len(prompt), dtype=np.int32)[None],
        config=tiny_ckpt.config)
    ref = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    rid = out[0].request_id
    engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=3), request_id="scored")
    first = None
    while engine.has_unfinished:
        first = next((o for o in engine.step() if o.request_id == "scored"), first)
    scores = first.prompt_logprobs
    assert rid and len(scores) == 41 and scores[0] is None
    for p, s in enumerate(scores[1:]):
        assert s.token_id == prompt[p + 1] and s.logprob == pytest.approx(ref[p, prompt[p + 1]], abs=1e-5)
        assert [t for t, _ in s.top] == list(np.argsort(-ref[p])[:3])
    assert list(out[0].token_ids) == greedy_reference(tiny_ckpt, prompt, 3)
    assert list(out[1].token_ids) == greedy_reference(tiny_ckpt, [5, 6, 7], 3)


def test_a_prompt_of_the_whole_context_is_scored(engine, tiny_ckpt):
    """A score-only prompt of exactly max_seq_len tokens (as lm-evaluation-harness sends) fits: the
    one sampled token is never read back, so no step is planned for it and no page past the pool's
    15 is wanted, with async scheduling on. One more token, or a second one to generate, is refused."""
    prompt = np.random.default_rng(11).integers(0, 260, 60).tolist()
    planned = []
    real_schedule = engine.scheduler.schedule

    def spy(now):
        plan = real_schedule(now)
        planned.extend([*(c.end for c in plan.prefills), *(s.total for s in plan.decodes)])
        return plan

    engine.scheduler.schedule = spy
    try:
        engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1), request_id="whole")
        outs = []
        while engine.has_unfinished:
            outs += engine.step()
    finally:
        engine.scheduler.schedule = real_schedule
    (out,) = outs
    assert engine.config.async_scheduling and out.finish_reason in ("length", "stop")
    assert len(out.prompt_logprobs) == 60 and max(planned) == 60
    ref = np.asarray(jax.nn.log_softmax(reference_logits(tiny_ckpt, prompt[:59])))  # what follows token 58
    assert out.prompt_logprobs[-1].logprob == pytest.approx(ref[prompt[59]], abs=1e-5)
    assert engine.kv.num_free == engine.kv.num_usable
    for ids, params in (([1] * 61, SamplingParams(max_tokens=1)), ([1] * 60, SamplingParams(max_tokens=2))):
        with pytest.raises(RequestError, match="context of 60"):
            engine.add_request(ids, params)


def test_forks_of_one_prompt_share_its_pages(tiny_ckpt):
    """n samples of one prompt: the forks wait for the prompt, then take its full pages from the
    prefix cache (ref-counted) and compute only its last partial page."""
    import dataclasses

    engine = Engine(tiny_ckpt, dataclasses.replace(TIGHT, max_num_batched_tokens=48, max_prefill_chunk=48))
    prompt = np.random.default_rng(9).integers(0, 260, 30).tolist()
    samples = [SamplingParams(max_tokens=5, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    engine.add_request(prompt, samples[0], request_id="n0")
    engine.add_request(prompt, samples[1], request_id="n1", fork_of="n0")
    engine.add_request(prompt, samples[2], request_id="n2", fork_of="n0")
    tokens, cached = {f"n{i}": [] for i in range(3)}, {}
    while engine.has_unfinished:
        for o in engine.step():
            tokens[o.request_id] += o.token_ids
            if o.finished:
                cached[o.request_id] = o.cached_tokens
    assert [cached[f"n{i}"] for i in range(3)] == [0, 28, 28]  # 7 full pages of 4 tokens shared
    alone = [list(engine.generate([prompt], p)[0].token_ids) for p in samples]
    assert [tokens[f"n{i}"] for i in range(3)] == alone  # each the same as run by itself
    assert len({tuple(t) for t in alone}) == 3
    assert engine.kv.num_free == engine.kv.num_usable


def test_logit_bias_and_min_tokens_match_a_host_reference(engine, tiny_ckpt):
    prompt, eos = [3, 0, 30], tiny_ckpt.tokenizer.eos_ids[0]  # greedy reaches EOS at its 6th token
    bias = ((17, 100.0), (40, -100.0))

    def reference(n, bias=(), min_tokens=0):
        ids = list(prompt)
        for step in range(n):
            logits = reference_logits(tiny_ckpt, ids).copy()
            for tid, b in bias:
                logits[tid] += b
            if step < min_tokens:
                logits[eos] = -np.inf
            ids.append(int(logits.argmax()))
            if ids[-1] == eos:
                return ids[len(prompt):-1]
        return ids[len(prompt):]

    biased = engine.generate([prompt], SamplingParams(max_tokens=6, logit_bias=bias, logprobs=0))[0]
    assert list(biased.token_ids) == reference(6, bias) and biased.token_ids[0] == 17
    # logprobs stay the model's own, before the bias
    assert biased.logprobs[0].logprob == pytest.approx(
        float(jax.nn.log_softmax(reference_logits(tiny_ckpt, prompt))[17]), abs=1e-5)
    held = engine.generate([prompt], SamplingParams(max_tokens=12, min_tokens=8))[0]
    assert list(held.token_ids) == reference(12, min_tokens=8) and len(held.token_ids) >= 8
    assert reference(12) == greedy_reference(tiny_ckpt, prompt, 12)[:5]  # without it, EOS at the 6th
    with pytest.raises(RequestError, match="logit_bias: token 999 is outside the vocabulary"):
        engine.add_request(prompt, SamplingParams(logit_bias=((999, 1.0),)))
    with pytest.raises(RequestError, match="min_tokens must be in"):
        engine.add_request(prompt, SamplingParams(max_tokens=3, min_tokens=4))


def test_prompt_scores_survive_chunking_and_preemption(engine, tiny_ckpt):
    """Every request scores its prompt while the tight pool preempts some of them part-way (their
    prompts are then recomputed in other chunks); the scores still equal the dense reference."""
    from meshserve.models.decoder import forward

    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 260, n).tolist() for n in (33, 17, 45, 24, 29, 40)]
    params = [SamplingParams(max_tokens=n, prompt_logprobs=1, ignore_eos=True) for n in (10, 14, 8, 12, 9, 6)]
    preempted, scores = [], {}
    real_schedule = engine.scheduler.schedule

    def spy(now):
        plan = real_schedule(now)
        preempted.extend(s for s in plan.preempted if s.num_preemptions and len(s.tokens) == s.prompt_len)
        return plan

    engine.scheduler.schedule = spy
    try:
        out = engine.generate(prompts, params, on_output=lambda o: o.prompt_logprobs and scores.setdefault(
            o.request_id, o.prompt_logprobs))
    finally:
        del engine.scheduler.schedule
    assert preempted, "some request must be preempted before its prompt is done"
    dense = jax.jit(forward, static_argnames="config")
    for prompt, completion in zip(prompts, out):
        logits, _ = dense(tiny_ckpt.params, np.asarray([prompt], np.int32),
                          np.arange(len(prompt), dtype=np.int32)[None], config=tiny_ckpt.config)
        ref = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        got = scores[completion.request_id]
        assert len(got) == len(prompt) and got[0] is None
        assert [s.token_id for s in got[1:]] == prompt[1:]
        # float32 logprobs of magnitude ~10, summed in another order (chunks, tiles): a few ulps apart
        np.testing.assert_allclose([s.logprob for s in got[1:]], [ref[p, prompt[p + 1]] for p in range(len(prompt) - 1)],
                                   rtol=4e-6, atol=1e-5)


def _mixed_workload(seed: int):
    """Prompts and params that take every path of a step: chunked prompts, preemption (TIGHT's
    pool), greedy and seeded sampling, penalties, stop strings and ids, logprobs, min_tokens."""
    rng = np.random.default_rng(seed)
    prompts, params = [], []
    for i in range(14):
        prompts.append(rng.integers(0, 260, int(rng.integers(1, 34))).tolist())
        kind = i % 7
        p = dict(max_tokens=int(rng.integers(1, 20)), ignore_eos=bool(i % 2), seed=i,
                 temperature=0.0 if kind < 3 else 0.9)
        if kind == 1:
            p.update(repetition_penalty=1.3, frequency_penalty=0.5)
        if kind == 2:
            p.update(stop_token_ids=tuple(range(i, 300, 4)), logprobs=3)  # likely to end early
        if kind == 4:
            p.update(stop=("e", "th"), min_tokens=2)
        if kind == 5:
            p.update(top_k=5, top_p=0.8)
        params.append(SamplingParams(**p))
    return prompts, params


def test_async_scheduling_gives_what_stepping_in_lock_step_gives(tiny_ckpt):
    """Step N+1 built and dispatched before step N is read back: the same tokens, texts, finish
    reasons and logprobs as reading every step back first, over chunking, preemption, penalties
    (which read the last step back before building) and every way a request ends."""
    import dataclasses

    prompts, params = _mixed_workload(3)
    runs = {}
    for mode in (True, False):
        engine = Engine(tiny_ckpt, dataclasses.replace(TIGHT, async_scheduling=mode))
        out = engine.generate(prompts, params)
        runs[mode] = [(c.token_ids, c.text, c.finish_reason, [(lp.token_id, round(lp.logprob, 4)) for lp in c.logprobs])
                      for c in out]
        assert engine.kv.num_free == engine.kv.num_usable and not engine._pending
    assert runs[True] == runs[False]
    assert {r[2] for r in runs[True]} == {"stop", "length"}


def test_async_scheduling_dispatches_the_next_step_before_reading_the_last(tiny_ckpt):
    """In steady decoding every step's programs are dispatched before the previous step's
    results are read; each step returns the previous step's tokens, one per request, and a
    request that ended is never returned again. One whose every token is sampled gets no further
    step (a request ended by EOS or a stop string may still have had its next row computed)."""
    engine = Engine(tiny_ckpt, TIGHT)
    events = []
    run, resolve = engine.runner.run, engine._resolve

    def spy_run(*args):
        events.append("dispatch")
        return run(*args)

    def spy_resolve(steps):
        events.append("read")
        return resolve(steps)

    engine.runner.run, engine._resolve = spy_run, spy_resolve
    a = engine.add_request([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
    b = engine.add_request([9, 8], SamplingParams(max_tokens=3, ignore_eos=True))
    got = {a: [], b: []}
    finished = []
    while engine.has_unfinished:
        for out in engine.step():
            assert out.request_id not in finished
            got[out.request_id].extend(out.token_ids)
            if out.finished:
                finished.append(out.request_id)
    assert got[a] == greedy_reference(tiny_ckpt, [5, 6, 7], 6) and got[b] == greedy_reference(tiny_ckpt, [9, 8], 3)
    assert events[:3] == ["dispatch", "dispatch", "read"]  # step 2 went out before step 1 came back
    assert events.count("dispatch") == 6  # 6 steps for a's tokens, none computed for nothing
    assert engine.kv.num_free == engine.kv.num_usable


def test_an_abort_while_the_next_step_runs_frees_pages_at_once(tiny_ckpt):
    engine = Engine(tiny_ckpt, TIGHT)
    rid = engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=40, ignore_eos=True))
    other = engine.add_request([7, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._pending  # a step is in flight
    assert engine.abort(rid)
    held = sum(len(s.pages) for s in engine.scheduler.running)
    assert engine.kv.num_free == engine.kv.num_usable - held  # the aborted one's are free now
    outs = []
    while engine.has_unfinished:
        outs.extend(engine.step())
    assert all(o.request_id == other for o in outs)
    assert engine.kv.num_free == engine.kv.num_usable


def test_a_mixture_of_experts_is_served_like_a_dense_model(tiny_ckpt, tmp_path):
    """Qwen3-MoE-shaped, in the tight pool (chunked prefill, preemption); then in a roomy one with host
    and store tiers: a prompt sharing a prefix evicted to the host, and a prompt whose pages another
    engine computed (disaggregated prefill). Always the no-cache reference's greedy tokens, no compile
    after start-up, and router statistics that count exactly the tokens fed (each once per expert it
    picked; padding and cached tokens never)."""
    import dataclasses

    from tests.sharding.test_expert_parallel import MOE
    from tests.sharding.test_sharded_engine import random_ckpt

    ckpt = random_ckpt(tiny_ckpt, MOE)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 17, 30, 9)]
    expected = [greedy_reference(ckpt, p, 8) for p in prompts]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    tight = Engine(ckpt, dataclasses.replace(TIGHT, kv_cache_bytes=16 * 3 * 2 * 4 * 4 * 8 * 4))
    assert tight.kv.num_usable * 4 < sum(len(p) + 8 for p in prompts)  # the pool cannot hold them all
    assert [list(c.token_ids) for c in tight.generate(prompts, params)] == expected

    roomy = dataclasses.replace(TIGHT, kv_cache_bytes=None, max_num_batched_tokens=32, host_kv_bytes=2**20,
                                kv_store=str(tmp_path / "kv"), kv_transfer=True,
                                compilation_cache_dir=str(tmp_path / "xla"))  # the decode engine's programs
    engine = Engine(ckpt, roomy)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    assert [list(c.token_ids) for c in engine.generate(prompts, params)] == expected
    layers, counts = engine.router_statistics()
    assert layers == (1, 2) and counts.shape == (2, 16)  # layer 0 is dense
    fed = sum(len(p) + 8 - 1 for p in prompts)  # the last token sampled is never fed
    assert (counts.sum(axis=1) == 2 * fed).all()

    assert engine.evict_prefix_cache() > 0  # the cached pages leave the device for the host
    shared = prompts[2] + [7, 7, 7]  # prompts[2]'s 7 full pages come back from the host
    [again] = engine.generate([shared], SamplingParams(max_tokens=4, ignore_eos=True))
    assert list(again.token_ids) == greedy_reference(ckpt, shared, 4)
    stats = engine.stats()
    assert stats["prefix_lower_hit_tokens"] == 28 and stats["host_pages_in"] == 7
    fed += len(shared) - 28 + 4 - 1
    assert (engine.router_statistics()[1].sum(axis=1) == 2 * fed).all()
    ids = rng.integers(0, 256, 21).tolist()
    engine.generate([ids], SamplingParams(max_tokens=1))  # as a prefill worker: the prompt's pages, for another
    assert compiles == []

    decode = Engine(ckpt, dataclasses.replace(roomy, host_kv_bytes=0, kv_store=None))
    assert decode.import_prompt(ids, engine.export_prompt(ids).to(jax.devices()[0])) == 5
    [moved] = decode.generate([ids], params)
    assert list(moved.token_ids) == greedy_reference(ckpt, ids, 8)
    assert (decode.router_statistics()[1].sum(axis=1) == 2 * (21 - 20 + 8 - 1)).all()  # only the tail fed
