import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.models.errors import RequestError
from meshserve.runtime.sampling import MAX_LOGPROBS, SamplingBatch, SamplingParams, sample

_sample = jax.jit(sample)


def _draw(logits, n, step=0, **params):
    p = SamplingParams(**params)
    batch = SamplingBatch.build([(p, seed, step, ()) for seed in range(n)], n)
    return np.asarray(_sample(jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1)), batch).tokens)


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).standard_normal((5, 50)).astype(np.float32)
    out = _sample(jnp.asarray(logits), SamplingBatch.build([(SamplingParams(), 0, 0, ())] * 5, 5))
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))
    np.testing.assert_allclose(out.logprob, jax.nn.log_softmax(logits)[np.arange(5), logits.argmax(-1)],
                               rtol=1e-6)


def test_same_seed_same_token_and_steps_differ():
    logits = np.zeros(1000, np.float32)  # uniform
    a = _draw(logits, 64, temperature=1.0)
    np.testing.assert_array_equal(a, _draw(logits, 64, temperature=1.0))
    assert len(set(a.tolist())) > 40  # different seeds spread out
    assert not np.array_equal(a, _draw(logits, 64, step=1, temperature=1.0))


def test_top_p_keeps_the_nucleus_only():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    draws = _draw(logits, 4000, temperature=1.0, top_p=0.5)
    # 0.4 < 0.5 so token 1 is needed too; token 2 starts after 0.7 >= 0.5 and is cut
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.4 / 0.7) < 0.03
    assert set(_draw(logits, 100, temperature=1.0, top_p=1e-6).tolist()) == {0}


def test_top_k_and_min_p():
    logits = np.log(np.array([0.35, 0.3, 0.2, 0.1, 0.05]))
    assert set(_draw(logits, 3000, temperature=1.0, top_k=2).tolist()) == {0, 1}
    # min_p 0.5: keep tokens at least half as likely as the best (0.35): 0.3 and 0.2 pass? 0.2 < 0.175? no
    assert set(_draw(logits, 3000, temperature=1.0, min_p=0.5).tolist()) == {0, 1, 2}
    assert set(_draw(logits, 3000, temperature=1.0, min_p=0.6).tolist()) == {0, 1}


def test_temperature_sharpens():
    logits = np.log(np.array([0.6, 0.4]))
    hot = (_draw(logits, 4000, temperature=1.0) == 0).mean()
    cold = (_draw(logits, 4000, temperature=0.25) == 0).mean()
    assert abs(hot - 0.6) < 0.03 and abs(cold - 0.6**4 / (0.6**4 + 0.4**4)) < 0.03


def test_top_logprobs():
    logits = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    batch = SamplingBatch.build([(SamplingParams(logprobs=5), 0, 0, ())] * 2, 2)
    out = _sample(jnp.asarray(logits), batch)
    ref = np.asarray(jax.nn.log_softmax(logits))
    assert out.top_ids.shape == (2, MAX_LOGPROBS)
    np.testing.assert_array_equal(out.top_ids[:, :5], np.argsort(-ref, axis=-1)[:, :5])
    np.testing.assert_allclose(out.top_logprobs[:, :5], np.sort(ref, axis=-1)[:, ::-1][:, :5], rtol=1e-6)


@pytest.mark.parametrize("params,message", [
    (dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(max_tokens=0), "max_tokens must be a positive integer, got 0"),
    (dict(top_k=-1), r"top_k must be in \[0, 2\*\*31\)"),
    (dict(top_k=2**40), r"top_k must be in \[0, 2\*\*31\)"),
    (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(presence_penalty=3.0), r"presence_penalty must be in \[-2, 2\]"),
    (dict(stop_token_ids=(10,)), "stop_token_ids: 10 is outside the vocabulary"),
    (dict(stop=("",)), "stop strings must be non-empty"),
    (dict(seed=-1), "seed must be in"),
])
def test_validation(params, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**params).validate(vocab_size=10)
