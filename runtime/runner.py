"""The model runner: turns a step plan into calls of the compiled programs.

    plan ──build (host, per request)──▶ [Call, …] ──run (device)──▶ pool', [(rows, Sampled), …]

Host work comes first and device work after. Every call of a step is built as host arrays before
the first one is dispatched, each request's rows on their own: a request whose rows cannot be built
is dropped from the step and fails alone, while nothing has touched the device. From the first
dispatch on, the KV pool is donated, so a fault there leaves the pool unknown: `run` lets it
propagate and the engine treats it as fatal.

Prefill: one call per prompt chunk (batch of one, by token-count bucket). Decode: one call per
batch bucket; with data replicas, rows [r·b/R, (r+1)·b/R) of a call are replica r's requests
(their pages live in its shard of the pool). A decode call that cannot be built drops all its
requests (no single row can be blamed), still before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence as Seq

import jax
import numpy as np

from meshserve.runtime.block_manager import NULL_PAGE, BlockManager
from meshserve.runtime.kv_cache import KVPool
from meshserve.runtime.programs import Buckets, Programs, StepBatch
from meshserve.runtime.sampling import SamplingBatch, SamplingParams
from meshserve.runtime.scheduler import PrefillChunk, Sequence, StepPlan

# (params, seed, whether its prompt is to be scored, token ids it cannot sample now) of a request
SamplingOf = Callable[[Sequence], tuple[SamplingParams, int, bool, tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class Call:
    shape: tuple[str, int, int, int]  # (family, batch, tokens, pages): which compiled program
    batch: StepBatch  # host arrays
    rows: tuple[tuple[int, Sequence], ...]  # (row, request) whose sampled token is wanted
    scored: tuple[tuple[int, Sequence, int, int], ...] = ()  # (row, request, first position, count) scored


@dataclasses.dataclass(frozen=True)
class _Row:
    """One request's part of a call: what it reads, writes and samples."""

    seq: Sequence
    tokens: np.ndarray  # i32[n] fed this call
    positions: np.ndarray  # i32[n]
    sampling: tuple[SamplingParams, int, int, tuple[int, ...]] | None  # (params, seed, step, held back)
    history: Seq[int] | None  # tokens up to the last position fed (penalized rows only)
    targets: np.ndarray | None  # i32[n]: the prompt token after each position fed (-1: none), when scored


class ModelRunner:
    def __init__(self, programs: Programs, buckets: Buckets, blocks: BlockManager, page_size: int):
        self.programs = programs
        self.buckets = buckets
        self.blocks = blocks
        self.page_size = page_size
        self.replicas = blocks.replicas

    # ---- host ----------------------------------------------------------------------------------

    def build(self, plan: StepPlan, sampling_of: SamplingOf) -> tuple[list[Call], dict[Sequence, Exception]]:
        """Every call of the step, and the requests dropped from it (with why)."""
        calls: list[Call] = []
        dropped: dict[Sequence, Exception] = {}
        for chunk in plan.prefills:
            try:
                calls.append(self._prefill(chunk, sampling_of))
            except Exception as e:  # this request's fault: it leaves the step, the rest goes on
                dropped[chunk.seq] = e
        rows = []
        for seq in plan.decodes:
            try:
                rows.append(self._decode_row(seq, sampling_of))
            except Exception as e:
                dropped[seq] = e
        for b, placed in self._decode_groups(rows):
            try:
                p = Buckets.pick(self.buckets.context_pages, max(len(row.seq.pages) for _, row in placed))
                calls.append(self._call("decode", placed, b, 1, p))
            except Exception as e:  # not one row's fault that can be told: the call's requests leave
                dropped.update((row.seq, e) for _, row in placed)
        return calls, dropped

    def _row(self, seq: Sequence, start: int, end: int, samples: bool, sampling_of: SamplingOf) -> _Row:
        params, seed, scores, held = sampling_of(seq)
        sampling = (params, seed, len(seq.tokens) - seq.prompt_len, held) if samples else None
        # penalties look at every token before the one sampled: tokens[:end], never more
        history = seq.tokens[:end] if samples and params.penalized else None
        targets = None
        if scores and start < seq.prompt_len - 1:  # position p scores prompt token p + 1
            targets = np.full(end - start, -1, np.int32)
            stop = min(end, seq.prompt_len - 1)
            targets[:stop - start] = seq.tokens[start + 1:stop + 1]
        return _Row(seq, np.asarray(seq.tokens[start:end], np.int32), np.arange(start, end, dtype=np.int32),
                    sampling, history, targets)

    def _prefill(self, chunk: PrefillChunk, sampling_of: SamplingOf) -> Call:
        row = self._row(chunk.seq, chunk.start, chunk.end, chunk.samples, sampling_of)
        t = Buckets.pick(self.buckets.prefill_tokens, len(row.tokens))
        p = Buckets.pick(self.buckets.context_pages, max(len(chunk.seq.pages), math.ceil(t / self.page_size)))
        return self._call("prefill", [(0, row)], 1, t, p)

    def _decode_row(self, seq: Sequence, sampling_of: SamplingOf) -> _Row:
        return self._row(seq, seq.num_computed, seq.num_computed + 1, True, sampling_of)

    def _decode_groups(self, rows: list[_Row]) -> list[tuple[int, list[tuple[int, _Row]]]]:
        """`rows` placed into decode calls: (batch bucket, [(row index, row)]) per call. Rows
        [r·b/R, (r+1)·b/R) are replica r's; a replica with more requests than the largest bucket
        spills into a further call."""
        R = self.replicas
        by_replica: list[list[_Row]] = [[] for _ in range(R)]
        for row in rows:
            by_replica[self.blocks.replica_of(row.seq.pages[0])].append(row)
        cap = self.buckets.decode_batch[-1] // R
        placed = []
        while any(by_replica):
            groups = [g[:cap] for g in by_replica]
            by_replica = [g[cap:] for g in by_replica]
            b = Buckets.pick(self.buckets.decode_batch, R * max(len(g) for g in groups))
            placed.append((b, [(r * (b // R) + i, row) for r, g in enumerate(groups) for i, row in enumerate(g)]))
        return placed

    def _call(self, family: str, placed: list[tuple[int, _Row]], b: int, t: int, p: int) -> Call:
        """Host arrays of one call; padding rows and tokens write to the null page, read nothing."""
        ps = self.page_size
        tokens = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        write_pages = np.full((b, t), NULL_PAGE, np.int32)
        write_slots = np.zeros((b, t), np.int32)
        tables = np.full((b, p), NULL_PAGE, np.int32)
        last = np.zeros(b, np.int32)
        prompt_len = np.zeros(b, np.int32)
        history = np.full((b, p * ps), -1, np.int32)
        targets = np.full((b, t), -1, np.int32)
        sampling: list[tuple[SamplingParams, int, int, tuple[int, ...]] | None] = [None] * b
        for r, row in placed:
            n, seq = len(row.tokens), row.seq
            tokens[r, :n] = row.tokens
            positions[r, :n] = row.positions
            write_pages[r, :n] = np.asarray(seq.pages, np.int32)[row.positions // ps]
            write_slots[r, :n] = row.positions % ps
            tables[r, :len(seq.pages)] = seq.pages
            last[r] = n - 1
            prompt_len[r] = seq.prompt_len
            sampling[r] = row.sampling
            if row.history is not None:
                history[r, :len(row.history)] = row.history
            if row.targets is not None:
                targets[r, :n] = row.targets
        batch = StepBatch(tokens, positions, tables, write_pages, write_slots, last,
                          SamplingBatch.build(sampling, b), history, prompt_len, targets)
        rows = tuple((r, row.seq) for r, row in placed if row.sampling is not None)
        scored = tuple((r, row.seq, int(row.positions[0]), int((row.targets >= 0).sum()))
                       for r, row in placed if row.targets is not None)
        return Call((family, b, t, p), batch, rows, scored)

    # ---- device --------------------------------------------------------------------------------

    def run(self, params, pool: KVPool, calls: list[Call]) -> tuple[KVPool, list]:
        """Dispatch every call back to back (no host sync between them); returns the new pool and
        each call's (call, Sampled, Scored) on the device. The pool is donated: an exception here
        leaves it unknown."""
        launched = []
        for call in calls:
            batch = call.batch
            if jax.process_count() > 1:  # every process holds the same host batch: give each its shards
                batch = jax.tree.map(
                    lambda host, sharding: jax.make_array_from_callback(host.shape, sharding,
                                                                        lambda i: host[i]),
                    batch, self.programs.batch_shardings[call.shape])
            pool, sampled, scored = self.programs.compiled[call.shape](params, pool, batch)
            launched.append((call, sampled, scored))
        return pool, launched
