"""serving/metrics.py: the router statistics of a mixture of experts as Prometheus histograms."""

import numpy as np
from prometheus_client import generate_latest

from meshserve.serving.metrics import Metrics


def test_router_statistics_are_a_histogram_over_expert_ids_per_layer():
    m = Metrics()
    assert b"meshserve_moe_expert_tokens" not in generate_latest(m.registry)  # a dense model: no series
    m.router.update((), np.zeros((0, 0), np.int64))
    assert b"meshserve_moe_expert_tokens" not in generate_latest(m.registry)
    m.router.update((1, 3), np.array([[2, 0, 1], [0, 0, 5]]))
    lines = generate_latest(m.registry).decode().splitlines()
    series = {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in lines if l.startswith("meshserve_moe_")}
    assert series == {
        'meshserve_moe_expert_tokens_bucket{layer="1",le="0"}': 2, 'meshserve_moe_expert_tokens_bucket{layer="1",le="1"}': 2,
        'meshserve_moe_expert_tokens_bucket{layer="1",le="2"}': 3, 'meshserve_moe_expert_tokens_bucket{layer="1",le="+Inf"}': 3,
        'meshserve_moe_expert_tokens_count{layer="1"}': 3, 'meshserve_moe_expert_tokens_sum{layer="1"}': 2,
        'meshserve_moe_expert_tokens_bucket{layer="3",le="0"}': 0, 'meshserve_moe_expert_tokens_bucket{layer="3",le="1"}': 0,
        'meshserve_moe_expert_tokens_bucket{layer="3",le="2"}': 5, 'meshserve_moe_expert_tokens_bucket{layer="3",le="+Inf"}': 5,
        'meshserve_moe_expert_tokens_count{layer="3"}': 5, 'meshserve_moe_expert_tokens_sum{layer="3"}': 10}
