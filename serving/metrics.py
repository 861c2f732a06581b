"""Prometheus metrics of the server, on their own registry (served on their own HTTP port).

Every request that reaches the server is counted once in `meshserve_requests_total`, by outcome.
Latencies are observed by the engine thread as outputs come out of a step, counted from the
request's arrival at the server (before tokenization): time to first token (arrival → first
token), inter-token latency (between a request's consecutive tokens, the first excluded),
end-to-end latency (arrival → last token) and queue time (arrival → first scheduled).

A mixture-of-experts model adds its router's statistics: `meshserve_moe_expert_tokens{layer}`, a
histogram per MoE layer over expert ids (bucket `le="e"` counts the tokens sent to experts 0…e, so
each expert's share is the difference of two buckets; each token counts once per expert it picked):
what to look at before deciding where experts go.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily

# meshserve_requests_total's labels: a finish reason, or why the call ended without one (serving/session.py)
OUTCOMES = ("stop", "length", "abort", "error", "rejected", "invalid", "too_large", "unavailable", "unauthenticated")

# Buckets from 1 ms to ~2 min, dense where interactive latencies sit.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 120.0)


class RouterStatistics:
    """The router histograms, from the engine's latest totals (`update` on the engine thread; Prometheus
    collects on its own: each reads one snapshot, replaced whole)."""

    def __init__(self):
        self._snapshot: tuple[tuple[int, ...], np.ndarray] | None = None

    def update(self, layers: tuple[int, ...], counts: np.ndarray) -> None:
        if len(layers):
            self._snapshot = (layers, counts)

    def collect(self):
        if self._snapshot is None:
            return
        layers, counts = self._snapshot
        family = HistogramMetricFamily("meshserve_moe_expert_tokens", "Tokens each MoE layer's router sent to "
                                       "each expert, as a histogram over expert ids", labels=["layer"])
        ids = np.arange(counts.shape[1])
        for layer, row in zip(layers, counts):
            cumulative = np.cumsum(row)
            buckets = [(str(e), float(c)) for e, c in zip(ids, cumulative)] + [("+Inf", float(cumulative[-1]))]
            family.add_metric([str(layer)], buckets, sum_value=float(ids @ row))
        yield family


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.router = RouterStatistics()
        r.register(self.router)
        self.requests = Counter("meshserve_requests", f"Finished requests by outcome ({', '.join(OUTCOMES)})",
                                ["outcome"], registry=r)
        self.ttft = Histogram("meshserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("meshserve_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("meshserve_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("meshserve_queue_time_seconds", "Arrival to first scheduled",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("meshserve_requests_running", "Requests being computed", registry=r)
        self.waiting = Gauge("meshserve_requests_waiting", "Requests in the waiting queue", registry=r)
        self.pages_used = Gauge("meshserve_kv_pages_used", "KV-cache pages in use", registry=r)
        self.pages_total = Gauge("meshserve_kv_pages_total", "KV-cache pages in all", registry=r)
        self.prompt_tokens = Counter("meshserve_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("meshserve_generation_tokens", "Generated tokens", registry=r)
        self.prefix_queried = Counter("meshserve_prefix_cache_queried_tokens",
                                      "Prompt tokens looked up in the prefix cache (tier=all)", ["tier"], registry=r)
        self.prefix_hits = Counter("meshserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                                   ["tier"], registry=r)
        self.tier_pages = Gauge("meshserve_kv_tier_pages", "Cached pages held by each lower tier (host, store)",
                                ["tier"], registry=r)
        self.pages_moved = Counter("meshserve_kv_pages_moved", "Cached pages copied between tiers",
                                   ["direction"], registry=r)
        self.bytes_moved = Counter("meshserve_kv_bytes_moved", "Bytes of cached pages copied between tiers",
                                   ["direction"], registry=r)
        self.store_misses = Counter("meshserve_kv_store_misses", "Store pages named by the store that could not "
                                    "be read (missing, damaged, not this model's): recomputed", registry=r)
        self.store_evicted = Counter("meshserve_kv_store_evictions", "Store pages deleted to keep the store "
                                     "within kv_store_bytes (least recently used first)", registry=r)
        self.pages_cached = Gauge("meshserve_kv_pages_cached", "KV pages holding a cached prefix page",
                                  registry=r)
        self.compilations = Counter("meshserve_compilations", "XLA compilations (all at warm-up when healthy)",
                                    registry=r)
        self.programs = Gauge("meshserve_programs", "Programs compiled at start-up (prefill and decode buckets)",
                              registry=r)
        self.http_refused = Counter("meshserve_http_connections_refused", "HTTP connections answered 503 and "
                                    "closed at once: server.http_max_connections were open", registry=r)
        self.kv_event_failures = Counter("meshserve_kv_event_failures", "KV events or load metrics a Dynamo "
                                         "worker could not publish (its router then routes on load alone)",
                                         registry=r)
        self.kv_transfers = Counter("meshserve_kv_transfers", "Prompts whose KV pages a disaggregated worker moved, "
                                    "by role, outcome (failed: the decode side computed the prompt itself) and "
                                    "transport (transfer: jax.experimental.transfer; store: a shared kvstore)",
                                    ["role", "outcome", "transport"], registry=r)
        self.kv_transfer_pages = Counter("meshserve_kv_transfer_pages", "KV pages offered (prefill) or pulled "
                                         "(decode) by a disaggregated worker", ["role"], registry=r)
        self.kv_transfer_bytes = Counter("meshserve_kv_transfer_bytes", "Bytes of KV pages offered (prefill) or "
                                         "pulled (decode) by a disaggregated worker", ["role"], registry=r)
        self.kv_pull_seconds = Histogram("meshserve_kv_pull_seconds", "Time a decode worker took to pull one "
                                         "prompt's KV pages", buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30),
                                         registry=r)
        # speculative decoding, as vLLM names them: acceptance rate = accepted / draft tokens, mean
        # acceptance length = 1 + accepted / drafts
        self.spec_drafts = Counter("meshserve_spec_decode_num_drafts", "Verify rows run (a request's drafts "
                                   "checked in one step)", registry=r)
        self.spec_draft_tokens = Counter("meshserve_spec_decode_num_draft_tokens", "Draft tokens proposed",
                                         registry=r)
        self.spec_accepted = Counter("meshserve_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                     registry=r)
        self.spec_accepted_per_pos = Counter("meshserve_spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted at each draft position (0: the first)",
                                             ["position"], registry=r)
        for role, outcome in (("prefill", "offered"), ("prefill", "failed"), ("decode", "pulled"),
                              ("decode", "failed")):
            for transport in ("transfer", "store"):
                self.kv_transfers.labels(role, outcome, transport)
        for role in ("prefill", "decode"):
            self.kv_transfer_pages.labels(role)
            self.kv_transfer_bytes.labels(role)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every series exists from the start
        self.prefix_queried.labels("all")
        for tier in ("device", "host", "store"):
            self.prefix_hits.labels(tier)
        for tier in ("host", "store"):
            self.tier_pages.labels(tier)
        for direction in ("device_to_host", "host_to_device", "host_to_store"):
            self.pages_moved.labels(direction)
            self.bytes_moved.labels(direction)

    SERIES = ("meshserve_requests_total", "meshserve_time_to_first_token_seconds",
              "meshserve_inter_token_latency_seconds", "meshserve_e2e_request_latency_seconds",
              "meshserve_queue_time_seconds", "meshserve_requests_running", "meshserve_requests_waiting",
              "meshserve_kv_pages_used", "meshserve_kv_pages_total", "meshserve_prompt_tokens_total",
              "meshserve_generation_tokens_total", "meshserve_compilations_total", "meshserve_kv_event_failures_total",
              "meshserve_prefix_cache_queried_tokens_total", "meshserve_prefix_cache_hit_tokens_total",
              "meshserve_kv_pages_cached", "meshserve_kv_tier_pages", "meshserve_kv_pages_moved_total",
              "meshserve_kv_bytes_moved_total", "meshserve_programs", "meshserve_kv_transfers_total",
              "meshserve_kv_transfer_pages_total", "meshserve_kv_transfer_bytes_total", "meshserve_kv_pull_seconds",
              "meshserve_http_connections_refused_total", "meshserve_kv_store_misses_total",
              "meshserve_kv_store_evictions_total", "meshserve_spec_decode_num_drafts_total",
              "meshserve_spec_decode_num_draft_tokens_total", "meshserve_spec_decode_num_accepted_tokens_total")

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
