"""models/moe.py: routing, both forms of the expert computation against a per-token loop, dropless
routing, padding rows, and experts split over shards."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.models import moe
from meshserve.models.moe import ExpertPlan

N, D, F, X, K = 37, 16, 24, 8, 2


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return {"router": rng.normal(size=(D, X)).astype(np.float32),
            "gate": rng.normal(size=(X, D, F)).astype(np.float32) / 4,
            "up": rng.normal(size=(X, D, F)).astype(np.float32) / 4,
            "down": rng.normal(size=(X, F, D)).astype(np.float32) / 4}


def reference(x, w, normalize=True):
    """Each token through its top-k experts one at a time, in float64."""
    x64 = x.astype(np.float64)
    logits = x64 @ w["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x64)
    for n in range(x.shape[0]):
        top = np.argsort(-probs[n], kind="stable")[:K]
        p = probs[n, top] / (probs[n, top].sum() if normalize else 1)
        for e, weight in zip(top, p):
            g, u = x64[n] @ w["gate"][e], x64[n] @ w["up"][e]
            out[n] += weight * ((g / (1 + np.exp(-g)) * u) @ w["down"][e])
    return out


def run(x, w, plan=ExpertPlan(), normalize=True):
    @jax.jit
    def f(x, router, gate, up, down):
        ids, weights = moe.route(x, router, K, normalize)
        return moe.experts_mlp(x, ids, weights, gate, up, down, plan)
    return np.asarray(f(x, w["router"], w["gate"], w["up"], w["down"]))


PLANS = {"all experts": ExpertPlan(method="all_experts"), "grouped, loop": ExpertPlan(method="grouped"),
         "grouped, ragged_dot": ExpertPlan(method="grouped", grouped="ragged_dot")}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("normalize", [True, False])
def test_every_form_equals_a_per_token_loop(weights, plan, normalize):
    x = np.random.default_rng(1).normal(size=(N, D)).astype(np.float32)
    np.testing.assert_allclose(run(x, weights, PLANS[plan], normalize), reference(x, weights, normalize),
                               rtol=1e-5, atol=1e-5)


def test_route_renormalises_the_top_k():
    x = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    router = jnp.asarray([[3.0, 2.0, 0.0], [0.0, 1.0, 2.0]])  # token 0 prefers 0 then 1; token 1: 2 then 1
    ids, w = moe.route(x, router, 2, normalize=True)
    assert ids.tolist() == [[0, 1], [2, 1]]
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    _, raw = moe.route(x, router, 2, normalize=False)
    assert float(raw[0].sum()) < 1.0


@pytest.mark.parametrize("method", ["all_experts", "grouped"])
def test_dropless_when_every_token_picks_expert_0(weights, method):
    """A router biased so that all tokens send their first choice to expert 0: nothing is dropped."""
    biased = dict(weights, router=weights["router"].copy())
    x = np.abs(np.random.default_rng(2).normal(size=(64, D)).astype(np.float32))
    biased["router"][:, 0] += 50.0  # x >= 0, so expert 0's logit dominates for every token
    ids, _ = moe.route(jnp.asarray(x), jnp.asarray(biased["router"]), K, True)
    assert (np.asarray(ids)[:, 0] == 0).all()
    np.testing.assert_allclose(run(x, biased, ExpertPlan(method=method)), reference(x, biased), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["all_experts", "grouped"])
def test_padding_rows_never_change_valid_rows(weights, method):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, D)).astype(np.float32)
    padded = np.concatenate([x, rng.normal(size=(27, D)).astype(np.float32) * 100])  # any junk
    np.testing.assert_array_equal(run(padded, weights, ExpertPlan(method=method))[:N],
                                  run(np.concatenate([x, np.zeros((27, D), np.float32)]), weights,
                                      ExpertPlan(method=method))[:N])


@pytest.mark.parametrize("shards", [2, 4, 8])
@pytest.mark.parametrize("plan", list(PLANS))
def test_experts_split_over_shards_sum_to_the_same(weights, shards, plan):
    x = np.random.default_rng(4).normal(size=(N, D)).astype(np.float32)
    split = dataclasses.replace(PLANS[plan], shards=shards)
    np.testing.assert_allclose(run(x, weights, split), reference(x, weights), rtol=1e-5, atol=1e-5)


def test_grouped_mlp_loop_equals_ragged_dot_and_a_per_row_loop(weights):
    """Both grouped MLPs agree with each row through its block's expert on the sorted, block-padded
    layout; the loop leaves the blocks past the used ones at zero."""
    b = 8
    sizes = jnp.asarray([16, 0, 8, 8, 0, 0, 24, 0], jnp.int32)  # whole blocks: 7 of the 8 in use
    block_expert = jnp.asarray([0, 0, 2, 3, 6, 6, 6, 7], jnp.int32)
    rows = np.random.default_rng(5).normal(size=(64, D)).astype(np.float32)
    w = tuple(jnp.asarray(weights[n]) for n in ("gate", "up", "down"))
    loop = np.asarray(moe.grouped_mlp(jnp.asarray(rows), *w, sizes, block_expert, jnp.int32(7), b, "loop"))
    ragged = np.asarray(moe.grouped_mlp(jnp.asarray(rows), *w, sizes, block_expert, jnp.int32(7), b, "ragged_dot"))
    expected = np.zeros((64, D))
    for i in range(56):
        e = int(block_expert[i // b])
        g, u = rows[i] @ weights["gate"][e], rows[i] @ weights["up"][e]
        expected[i] = (g / (1 + np.exp(-g)) * u) @ weights["down"][e]
    np.testing.assert_allclose(loop, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ragged[:56], expected[:56], rtol=1e-5, atol=1e-5)
    assert not loop[56:].any()


@pytest.mark.parametrize("assignments,experts", [(1, 1), (8, 64), (32, 8), (128, 64), (4096, 8), (16384, 128)])
def test_block_layout_holds_any_routing(assignments, experts):
    """Σ ceil(n_e / b) blocks fit in the static count for the worst splits of the assignments: as
    many groups as can be one row past a whole block, the rest in one group."""
    b, blocks = moe.block_layout(assignments, experts)
    assert b & (b - 1) == 0 and 1 <= b <= 256  # a power of two
    groups = min(experts, assignments)
    for g in range(1, groups + 1):
        for extra in (1, b + 1):  # g - 1 groups of `extra` rows, the rest in one
            if (g - 1) * extra >= assignments:
                continue
            sizes = [extra] * (g - 1) + [assignments - (g - 1) * extra]
            assert sum(-(-n // b) for n in sizes) <= blocks, (g, extra)


def test_tokens_per_expert_counts_only_valid_rows():
    ids = jnp.asarray([[0, 1], [1, 2], [0, 3]])
    counts = moe.tokens_per_expert(ids, jnp.asarray([True, True, False]), 4)
    assert counts.tolist() == [1, 2, 1, 0]


def test_plan_is_checked():
    with pytest.raises(ValueError, match="grouped must be one of loop, ragged_dot"):
        ExpertPlan(grouped="magic")
    with pytest.raises(ValueError, match="cannot be split over 3 shards"):
        run(np.zeros((4, D), np.float32), {"router": np.zeros((D, X), np.float32),
                                            "gate": np.zeros((X, D, F), np.float32),
                                            "up": np.zeros((X, D, F), np.float32),
                                            "down": np.zeros((X, F, D), np.float32)}, ExpertPlan(shards=3))
