"""Speculative decoding: the proposer, the rejection sampler (lossless), and the engine's verify steps
against plain decoding and the no-cache reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from meshserve.models.errors import ConfigError, RequestError
from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.sampling import SamplingBatch, SamplingParams, verify_drafts
from meshserve.runtime.speculative import SpeculativeConfig, ngram_propose
from tests.runtime.conftest import greedy_reference
from tests.runtime.test_engine import TIGHT

SPEC = dataclasses.replace(TIGHT, speculative=SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1,
                                                                disable_by_batch_size=4))


def test_ngram_proposes_what_followed_the_latest_occurrence_of_the_longest_suffix():
    t = np.array([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3], np.int32)
    assert ngram_propose(t, 3, 1, 4) == (7, 8, 5)  # suffix (2, 3): latest earlier occurrence at 6
    assert ngram_propose(t, 1, 1, 4) == (7,)
    assert ngram_propose(np.array([4, 5, 6], np.int32), 3, 1, 3) == ()
    assert ngram_propose(np.array([5, 1, 5, 2, 5], np.int32), 2, 1, 3) == (2, 5)  # one token: the latest 5
    assert ngram_propose(np.array([5, 1, 5, 2, 5], np.int32), 2, 2, 3) == ()


@pytest.mark.parametrize("field, value, message", [
    ("num_speculative_tokens", 16, r"num_speculative_tokens must be in \[1, 15\], got 16"),
    ("num_speculative_tokens", 0, "num_speculative_tokens must be a positive integer, got 0"),
    ("method", "eagle3", "speculative.method must be one of ngram, draft_model, got 'eagle3'"),
    ("prompt_lookup_min", 5, r"prompt_lookup_min \(5\) must be <= prompt_lookup_max \(4\)"),
])
def test_a_speculative_config_out_of_range_is_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_dict({"speculative": {field: value}})
    with pytest.raises(ConfigError, match="speculative: unknown field"):
        EngineConfig.from_dict({"speculative": {"k": 3}})


# ---- the rejection sampler ---------------------------------------------------------------------------

P0 = np.array([0.4, 0.3, 0.15, 0.1, 0.05])  # the target's distribution after the last token …
P1 = np.array([0.1, 0.2, 0.3, 0.25, 0.15])  # … and after the draft (token 1)
N = 20_000


def _speculative_samples(temperature=1.0):
    """N rows (seeds), each with one draft (token 1) over P0 then P1: the tokens they produce."""
    logits = jnp.broadcast_to(jnp.log(jnp.asarray([P0, P1], jnp.float32))[None], (N, 2, 5))
    s = SamplingBatch.build([(SamplingParams(temperature=temperature), seed, 0, ()) for seed in range(N)], N)
    out, accepted = jax.jit(verify_drafts)(logits, jnp.ones((N, 1), jnp.int32), jnp.ones(N, jnp.int32), s)
    return np.asarray(out.tokens), np.asarray(accepted)


def _wrong_samples(rng):
    """The classic mistake: on rejection, draw from the target's whole distribution (the draft
    included) instead of the residual."""
    accept = rng.random(N) < P0[1]
    return np.where(accept, 1, rng.choice(5, N, p=P0))


def test_rejection_sampling_leaves_the_target_distribution_and_a_wrong_sampler_is_caught():
    tokens, accepted = _speculative_samples()
    first = np.bincount(tokens[:, 0], minlength=5)
    assert chisquare(first, P0 * N).pvalue > 0.01
    assert abs(accepted.mean() - P0[1]) < 0.02  # the draft is accepted with probability p(draft)
    second = np.bincount(tokens[accepted == 1, 1], minlength=5)  # the bonus token, after the draft
    assert chisquare(second, P1 * second.sum()).pvalue > 0.01
    wrong = np.bincount(_wrong_samples(np.random.default_rng(0)), minlength=5)
    assert chisquare(wrong, P0 * N).pvalue < 0.01


def test_greedy_rows_accept_while_the_draft_is_the_argmax():
    logits = jnp.asarray(np.eye(6, dtype=np.float32)[[[2, 3, 4, 5], [2, 3, 4, 5], [1, 1, 1, 1]]] * 5)
    drafts = jnp.asarray([[2, 3, 9], [2, 0, 4], [1, 1, 1]], jnp.int32)
    s = SamplingBatch.build([(SamplingParams(), 0, 0, ())] * 3, 3)
    out, accepted = verify_drafts(logits, drafts, jnp.asarray([3, 3, 2], jnp.int32), s)
    assert accepted.tolist() == [2, 1, 2]  # row 2: both of its 2 drafts, then the bonus token
    assert out.tokens[0, :3].tolist() == [2, 3, 4]  # two drafts, then the argmax where 9 was rejected
    assert out.tokens[1, :2].tolist() == [2, 3]
    assert out.tokens[2, :3].tolist() == [1, 1, 1]


# ---- the engine --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spec_engine(tiny_ckpt):
    return Engine(tiny_ckpt, SPEC)


def _arrivals(engine, prompts, params, stagger: int):
    """Run `prompts`, adding one every `stagger` steps; tokens per request in order."""
    ids, out, pending = [], {}, list(zip(prompts, params))
    steps = 0
    while pending or engine.has_unfinished:
        if pending and steps % stagger == 0:
            prompt, p = pending.pop(0)
            ids.append(engine.add_request(prompt, p))
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
        steps += 1
    return [out[i] for i in ids]


def _load(seed=0):
    rng = np.random.default_rng(seed)
    lengths = [3, 17, 33, 5, 24, 2]
    prompts = [rng.integers(0, 260, n).tolist() for n in lengths]
    prompts[3] = [7, 8, 9] * 5  # repeats: the n-gram proposer finds its drafts
    news = [20, 14, 9, 24, 10, 18]
    return prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in news]


@pytest.mark.parametrize("proposer", ["ngram", "accept-all", "reject-all"])
def test_greedy_output_is_the_reference_under_load(spec_engine, tiny_ckpt, proposer, monkeypatch):
    """Staggered arrivals, chunked prefill and preemption (TIGHT's 15 pages), drafts from the n-gram
    proposer, from the reference itself (every draft accepted), or always wrong (every one rejected):
    the same tokens as the no-cache forward pass, every page back at the end, nothing compiled."""
    prompts, params = _load()
    refs = {tuple(p): greedy_reference(tiny_ckpt, p, sp.max_tokens) for p, sp in zip(prompts, params)}
    spec = spec_engine.speculator
    if proposer != "ngram":
        def propose(seq, room):
            ref = refs[tuple(seq.tokens[:seq.prompt_len])]
            done = len(seq.tokens) - seq.prompt_len
            draft = ref[done:done + min(3, room)]
            return tuple(draft) if proposer == "accept-all" else tuple((t + 1) % 300 for t in draft)
        monkeypatch.setattr(spec, "propose", propose)
    before = (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens)
    preempted = []
    real_schedule = spec_engine.scheduler.schedule
    monkeypatch.setattr(spec_engine.scheduler, "schedule",
                        lambda now: (plan := real_schedule(now), preempted.extend(plan.preempted))[0])
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    out = _arrivals(spec_engine, prompts, params, stagger=3)
    for prompt, sp, tokens in zip(prompts, params, out):
        assert tokens == refs[tuple(prompt)]
    drafts, proposed, accepted = (a - b for a, b in zip((spec.num_drafts, spec.num_draft_tokens,
                                                         spec.num_accepted_tokens), before))
    assert drafts >= (3 if proposer == "ngram" else 10) and preempted
    if proposer == "accept-all":
        assert accepted == proposed
    elif proposer == "reject-all":
        assert accepted == 0
    else:  # a random model does not repeat itself: its drafts are rejected (acceptance: accept-all)
        assert proposed > 0
    assert spec_engine.kv.num_free == spec_engine.kv.num_usable
    assert compiles == []


def _kv_at(engine, seq, n):
    """Keys and values of `seq`'s first n positions, every layer, gathered through its page table."""
    ps = engine.config.page_size
    pos = np.arange(n)
    pages, slots = np.asarray(seq.pages)[pos // ps], pos % ps
    return [np.asarray(layer[pages, slots]) for layer in (*engine.pool.k, *engine.pool.v)]


@pytest.mark.parametrize("proposer", ["accept-all", "reject-all"])
def test_kv_pages_after_verify_steps_equal_plain_decoding(tiny_ckpt, spec_engine, proposer, monkeypatch):
    prompt, n = [7, 8, 9] * 5 + [1, 2], 30
    ref = greedy_reference(tiny_ckpt, prompt, n)

    def propose(seq, room):
        done = len(seq.tokens) - seq.prompt_len
        draft = ref[done:done + min(4, room)]
        return tuple(draft) if proposer == "accept-all" else tuple((t + 7) % 300 for t in draft)

    monkeypatch.setattr(spec_engine.speculator, "propose", propose)
    plain = Engine(tiny_ckpt, dataclasses.replace(TIGHT, async_scheduling=False))
    seqs = []
    for engine in (spec_engine, plain):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
        seq = engine.outputs.requests[rid].seq
        while seq.num_computed < len(prompt) + 20:
            engine.step()
        seqs.append(seq)
    spec_seq, plain_seq = seqs
    ps = spec_engine.config.page_size
    assert len(spec_seq.pages) == -(-(spec_seq.num_computed + 1) // ps)  # rejected drafts' pages given back
    m = min(spec_seq.num_computed, plain_seq.num_computed)
    assert m >= len(prompt) + 20
    for a, b in zip(_kv_at(spec_engine, spec_seq, m), _kv_at(plain, plain_seq, m)):
        # a verify step's tokens go through the matmuls five at a time, a plain decode's one at a
        # time: the same values up to float32 rounding (a wrong position or token is off by O(1))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    for engine in (spec_engine, plain):
        while engine.has_unfinished:
            engine.step()


def _run(engine, requests):
    """requests: (prompt, params, index of the request it forks or None); (tokens, text, logprobs) each."""
    ids, out = [], {}
    for prompt, params, fork in requests:
        ids.append(engine.add_request(prompt, params, fork_of=None if fork is None else ids[fork]))
    while engine.has_unfinished:
        for o in engine.step():
            tokens, text, logprobs = out.setdefault(o.request_id, ([], [], []))
            tokens += o.token_ids
            text.append(o.text)
            logprobs += [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs]
    return [(out[i][0], "".join(out[i][1]), out[i][2]) for i in ids]


def test_logprobs_stop_strings_and_forks_are_those_of_plain_decoding(tiny_ckpt, spec_engine, monkeypatch):
    """Drafts the target accepts (its own greedy tokens) turn several tokens a step into outputs: their
    logprobs are the target's, a stop string inside them ends the request where plain decoding does,
    and a fork (n > 1) speculates on its own."""
    plain = Engine(tiny_ckpt, TIGHT)
    prompts = ["hello hello hello", "abcabcabc", "the theory of"]
    first = SamplingParams(max_tokens=14, logprobs=2, ignore_eos=True)
    base = _run(plain, [(p, first, None) for p in prompts])
    stop = base[1][1][6:8]  # two characters of the middle output's text
    requests = [(prompts[0], first, None), (prompts[1], dataclasses.replace(first, stop=(stop,)), None),
                (prompts[2], first, None), (prompts[2], first, 2)]
    expected = _run(plain, requests)
    refs = {tuple(plain.tokenizer.encode(p)): base[i][0] for i, p in enumerate(prompts)}

    def propose(seq, room):
        done = len(seq.tokens) - seq.prompt_len
        return tuple(refs[tuple(seq.tokens[:seq.prompt_len])][done:done + min(4, room)])

    monkeypatch.setattr(spec_engine.speculator, "propose", propose)
    before = spec_engine.speculator.num_accepted_tokens
    got = _run(spec_engine, requests)
    assert spec_engine.speculator.num_accepted_tokens - before > 10
    assert len(expected[1][0]) < 14  # the stop string ended it
    for (tokens, text, logprobs), (want_tokens, want_text, want_logprobs) in zip(got, expected):
        assert (tokens, text) == (want_tokens, want_text)
        assert [(t, top[0][0]) for t, _, top in logprobs] == [(t, top[0][0]) for t, _, top in want_logprobs]
        np.testing.assert_allclose([lp for _, lp, _ in logprobs], [lp for _, lp, _ in want_logprobs], atol=1e-4)


def test_a_qwen3_target_gives_its_reference_tokens(tmp_path, monkeypatch):
    """Qwen3's q/k norms in the verify step: drafts right for two tokens then wrong."""
    from meshserve.models.config import ModelConfig
    from tests.conftest import TINY_CONFIG
    from tests.helpers import random_checkpoint

    ckpt = random_checkpoint(ModelConfig(**{**TINY_CONFIG, "architecture": "qwen3", "qk_norm": True}), tmp_path,
                             seed=5)
    prompts, params = _load(1)
    refs = {tuple(p): greedy_reference(ckpt, p, sp.max_tokens) for p, sp in zip(prompts, params)}
    engine = Engine(ckpt, SPEC)

    def propose(seq, room):
        done = len(seq.tokens) - seq.prompt_len
        draft = list(refs[tuple(seq.tokens[:seq.prompt_len])][done:done + min(3, room)])
        return tuple(draft[:2] + [(t + 1) % 300 for t in draft[2:]])

    monkeypatch.setattr(engine.speculator, "propose", propose)
    out = _arrivals(engine, prompts, params, stagger=2)
    assert [refs[tuple(p)] for p in prompts] == out
    spec = engine.speculator
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens


# ---- a draft model ------------------------------------------------------------------------------------

def _saved(ckpt, folder):
    from meshserve.models.checkpoint import save_checkpoint

    return str(save_checkpoint(folder, ckpt.config, ckpt.params, ckpt.tokenizer))


@pytest.mark.parametrize("draft_seed", [2, 7])
def test_a_draft_model_gives_the_targets_greedy_tokens(tiny_ckpt, tmp_path, draft_seed):
    """A draft with the target's own weights (every draft accepted) and a random one (most rejected):
    the target's tokens under load, every page of both engines back at the end."""
    from meshserve.models.config import ModelConfig
    from tests.conftest import TINY_CONFIG
    from tests.helpers import random_checkpoint

    draft = tiny_ckpt if draft_seed == 2 else random_checkpoint(ModelConfig(**{**TINY_CONFIG, "num_layers": 1}),
                                                                 tmp_path / "tok", seed=draft_seed)
    spec = SpeculativeConfig(method="draft_model", model=_saved(draft, tmp_path / "draft"), num_speculative_tokens=3)
    engine = Engine(tiny_ckpt, dataclasses.replace(SPEC, speculative=spec))
    prompts, params = _load(2)
    out = _arrivals(engine, prompts, params, stagger=3)
    assert out == [greedy_reference(tiny_ckpt, p, sp.max_tokens) for p, sp in zip(prompts, params)]
    s = engine.speculator
    assert s.num_drafts >= 10
    if draft_seed == 2:
        assert s.num_accepted_tokens == s.num_draft_tokens
    else:
        assert s.num_accepted_tokens < s.num_draft_tokens / 2
    for e in (engine, s.draft.engine):
        assert e.kv.num_free == e.kv.num_usable


def test_a_draft_model_with_another_tokenizer_is_refused_naming_both(tiny_ckpt, tmp_path):
    from meshserve.models.tokenizer import Tokenizer
    from tests.helpers import write_tokenizer

    other = tmp_path / "other-tok"
    other.mkdir()
    write_tokenizer(other)
    vocab = Tokenizer.load(other).backend.get_vocab()
    assert vocab == tiny_ckpt.tokenizer.backend.get_vocab()  # the same writer: change one token
    backend = Tokenizer.load(other)
    backend.backend.add_tokens(["<|extra|>"])
    draft = dataclasses.replace(tiny_ckpt, tokenizer=backend)
    spec = SpeculativeConfig(method="draft_model", model=_saved(draft, tmp_path / "draft"))
    with pytest.raises(ConfigError, match=r"the draft model '.*draft' \(tiny, vocabulary 265\) has another "
                                          r"tokenizer than the target 'tiny' \(vocabulary 264\)"):
        Engine(tiny_ckpt, dataclasses.replace(SPEC, speculative=spec))
    with pytest.raises(ConfigError, match="speculative.model .* goes with method draft_model"):
        SpeculativeConfig(method="draft_model")


def test_sampled_rows_speculate_reproducibly_and_free_their_pages(spec_engine):
    """Temperature 1 with top-p and a logit bias under n-gram drafts: the same seed gives the same
    tokens, run after run, and the outputs end as asked."""
    prompts = [[7, 8, 9] * 6, [1, 2, 3, 1, 2, 3, 1, 2]]
    params = [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True,
                             logit_bias=((7, 5.0),)) for s in (1, 2)]
    before = spec_engine.speculator.num_drafts
    runs = [[list(c.token_ids) for c in spec_engine.generate(prompts, params)] for _ in range(2)]
    assert runs[0] == runs[1] and all(len(t) == 16 for t in runs[0])
    assert spec_engine.speculator.num_drafts > before
    assert spec_engine.kv.num_free == spec_engine.kv.num_usable


def test_a_request_sets_its_own_draft_length_or_none(spec_engine, tiny_ckpt, monkeypatch):
    """num_speculative_tokens on a request: 0 decodes it plainly beside speculating requests, 1 caps
    every one of its verify rows at one draft, unset takes the server's 4; drafts from the reference
    (so all accepted: the length never adapts down), the tokens the reference's either way."""
    from meshserve.runtime import speculative

    prompts = [[7, 8, 9] * 5, [4, 5, 6] * 5, [1, 2] * 8]
    refs = {tuple(p): greedy_reference(tiny_ckpt, p, 16) for p in prompts}

    def propose(tokens, k, lo, hi):
        prompt = next(p for p in refs if tuple(tokens[:len(p)]) == p)
        done = len(tokens) - len(prompt)
        return tuple(refs[prompt][done:done + k])

    monkeypatch.setattr(speculative, "ngram_propose", propose)
    rows = []  # (prompt, drafts) of every verify row
    spec = spec_engine.speculator
    real_record = spec.record
    monkeypatch.setattr(spec, "record", lambda seq, proposed, accepted: (
        rows.append((tuple(seq.tokens[:seq.prompt_len]), proposed)), real_record(seq, proposed, accepted)))
    params = [SamplingParams(max_tokens=16, ignore_eos=True, num_speculative_tokens=k) for k in (0, 1, None)]
    out = spec_engine.generate(prompts, params)
    assert [list(c.token_ids) for c in out] == [refs[tuple(p)] for p in prompts]
    drafts = {p: [n for q, n in rows if q == tuple(p)] for p in map(tuple, prompts)}
    assert drafts[tuple(prompts[0])] == []  # 0: never a verify row
    assert drafts[tuple(prompts[1])] and set(drafts[tuple(prompts[1])]) == {1}
    assert drafts[tuple(prompts[2])] and max(drafts[tuple(prompts[2])]) == 4  # the server's
    assert spec_engine.kv.num_free == spec_engine.kv.num_usable


@pytest.mark.parametrize("speculating, k, message", [
    (True, 5, r"num_speculative_tokens must be in \[0, 4\] \(the server's speculative config\), got 5"),
    (True, -1, "num_speculative_tokens must be a non-negative integer, got -1"),
    (False, 2, r"num_speculative_tokens: this server does not speculate \(asked for 2\)"),
])
def test_a_draft_length_the_server_cannot_give_is_named(spec_engine, tiny_ckpt, speculating, k, message):
    engine = spec_engine if speculating else Engine(tiny_ckpt, TIGHT)
    with pytest.raises(RequestError, match=message):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, num_speculative_tokens=k))
    if not speculating:  # asking for none is always fine
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, num_speculative_tokens=0))
