import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.errors import RequestError
from runtime.sampling import sample, validate

_sample = jax.jit(sample)


def _draw(logits, temperature, top_p, seeds, step=0):
    n = len(seeds)
    return np.asarray(_sample(jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1)),
                              jnp.full(n, temperature, jnp.float32), jnp.full(n, top_p, jnp.float32),
                              jnp.asarray(seeds, jnp.int32), jnp.full(n, step, jnp.int32)))


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).standard_normal((5, 50)).astype(np.float32)
    out = _sample(jnp.asarray(logits), jnp.zeros(5), jnp.ones(5), jnp.arange(5), jnp.zeros(5, jnp.int32))
    np.testing.assert_array_equal(out, logits.argmax(-1))


def test_same_seed_same_token_and_steps_differ():
    logits = np.zeros(1000, np.float32)  # uniform
    a = _draw(logits, 1.0, 1.0, range(64))
    np.testing.assert_array_equal(a, _draw(logits, 1.0, 1.0, range(64)))
    assert len(set(a.tolist())) > 40  # different seeds spread out
    assert not np.array_equal(a, _draw(logits, 1.0, 1.0, range(64), step=1))


def test_top_p_keeps_the_nucleus_only():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    draws = _draw(np.log(probs), 1.0, 0.5, range(4000))
    # 0.4 < 0.5 so token 1 is needed too; token 2 starts after 0.7 ≥ 0.5 and is cut
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.4 / 0.7) < 0.03
    assert set(_draw(np.log(probs), 1.0, 1e-6, range(100)).tolist()) == {0}


def test_temperature_sharpens():
    logits = np.log(np.array([0.6, 0.4]))
    hot = (_draw(logits, 1.0, 1.0, range(4000)) == 0).mean()
    cold = (_draw(logits, 0.25, 1.0, range(4000)) == 0).mean()
    assert abs(hot - 0.6) < 0.03 and abs(cold - 0.6**4 / (0.6**4 + 0.4**4)) < 0.03


@pytest.mark.parametrize("args,message", [
    ((-0.1, 1.0, 8), "temperature must be >= 0, got -0.1"),
    ((1.0, 0.0, 8), r"top_p must be in \(0, 1\], got 0.0"),
    ((1.0, 1.5, 8), r"top_p must be in \(0, 1\], got 1.5"),
    ((1.0, 1.0, 0), "max_tokens must be positive, got 0"),
])
def test_validation(args, message):
    with pytest.raises(RequestError, match=message):
        validate(*args)
