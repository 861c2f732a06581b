"""The model runner: turns a step plan into calls of the compiled programs.

    plan ──build (host, per request)──▶ [Call, …] ──run (device)──▶ pool', [(rows, Sampled), …]

Host work comes first and device work after. Every call of a step is built as host arrays before
the first one is dispatched, each request's rows on their own: a request whose rows cannot be built
is dropped from the step and fails alone, while nothing has touched the device. From the first
dispatch on, the KV pool is donated, so a fault there leaves the pool unknown: `run` lets it
propagate and the engine treats it as fatal.

Prefill: the step's prompt chunks packed into as few ragged calls as the largest buckets allow
(tokens, rows, context pages), usually one: the weights are read once for all of them. Decode: one
call per batch bucket; with data replicas, rows [r·b/R, (r+1)·b/R) of a call are replica r's
requests (their pages live in its shard of the pool). A call that cannot be built drops all its
requests (no single row can be blamed), still before anything runs.

Verify (speculative decoding): a decode that carries drafts goes into a verify call instead, one
per batch bucket of `verify_batch` (grouped by replica as decodes are): its last token and drafts,
padded to the programs' width. Its tokens are all on the host (the engine read them back to propose).

Slots: each running request owns a slot of the programs' `last` token array while it runs; its
sampled tokens are written there on the device, and a decode row whose input token the host does
not know yet (-1, PENDING: the engine dispatched this step before reading the last one back) reads
it from there.

Masks: a call with a row under a grammar (structured outputs) sends each row's allowed tokens,
filled by its matcher in parallel on llguidance's threads (runtime/grammar.py); the matcher has
accepted every token before it (the engine reads a constrained row's last token back before it
builds its next). A call without one sends nothing: an all-allowed mask kept on the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence as Seq

import jax
import numpy as np

from meshserve.runtime.block_manager import NULL_PAGE
from meshserve.runtime.grammar import GrammarCompiler, all_allowed, fill_masks
from meshserve.runtime.kv_cache import KVPool
from meshserve.runtime.programs import (DECODE_INTS, PREFILL_ROW_INTS, PREFILL_TOKEN_FIELDS, VERIFY_INTS, Buckets,
                                        DecodeBatch, PrefillBatch, Programs, VerifyBatch, mask_words)
from meshserve.runtime.sampling import SamplingBatch, SamplingParams
from meshserve.runtime.kv_manager import KVManager
from meshserve.runtime.scheduler import Sequence, Status, StepPlan

PENDING = -1  # a sampled token still on the device: its row reads it from its slot of `last`

# (params, seed, whether its prompt is to be scored, token ids it cannot sample now, its grammar's
# matcher or None) of a request
SamplingOf = Callable[[Sequence], tuple[SamplingParams, int, bool, tuple[int, ...], Any]]


@dataclasses.dataclass(frozen=True)
class Call:
    shape: tuple[str, int, int, int]  # (family, rows, tokens, pages): which compiled program
    batch: DecodeBatch | PrefillBatch | VerifyBatch  # host arrays
    rows: tuple[tuple[int, Sequence], ...]  # (row, request) whose sampled token is wanted
    # (where its scores start in Scored — (index 0, index 1) —, request, first position, count)
    scored: tuple[tuple[tuple[int, int], Sequence, int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class _Row:
    """One request's part of a call: what it reads, writes and samples."""

    seq: Sequence
    tokens: np.ndarray | tuple[int]  # i32[n] fed this call (a decode's: a tuple of one)
    positions: np.ndarray | tuple[int]  # i32[n]
    sampling: tuple[SamplingParams, int, int, tuple[int, ...]] | None  # (params, seed, step, held back)
    history: Seq[int] | None  # tokens up to the last position fed (penalized rows only)
    targets: np.ndarray | None  # i32[n]: the prompt token after each position fed (-1: none), when scored
    matcher: Any = None  # its grammar's, when it samples under one


class ModelRunner:
    def __init__(self, programs: Programs, buckets: Buckets, kv: KVManager, page_size: int,
                 grammars: GrammarCompiler | None = None):
        self.programs = programs
        self.grammars = grammars
        self.mask_words = mask_words(programs.config.vocab_size)
        self._all_allowed: dict[tuple, np.ndarray | jax.Array] = {}
        self.buckets = buckets
        self.kv = kv  # read only: which replica a request's pages are on
        self.page_size = page_size
        self.replicas = kv.replicas
        self._no_history: dict[tuple, np.ndarray | jax.Array] = {}
        self.padding_slot = buckets.slots - 1
        self._slots: dict[Sequence, int] = {}
        self._free_slots = list(range(self.padding_slot - 1, -1, -1))
        self.last = self._device_array(np.zeros(buckets.slots, np.int32), replicated=True)

    def _device_array(self, host: np.ndarray, sharding=None, replicated: bool = False):
        """`host` on the programs' devices: replicated over the mesh, or with `sharding`, or on the
        one device (every process of a multi-process mesh passes the same host array)."""
        layout = self.programs.layout
        if replicated and layout.mesh.size > 1:
            sharding = layout.replicated()
        if jax.process_count() > 1:
            return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])
        return jax.device_put(host, sharding if sharding is not None else layout.mesh.devices.flat[0])

    def slot(self, seq: Sequence) -> int:
        """`seq`'s slot of `last` (it keeps it while it runs)."""
        slot = self._slots.get(seq)
        if slot is None:
            slot = self._slots[seq] = self._free_slots.pop()
        return slot

    def _release_slots(self) -> None:
        """Slots of requests no longer running (finished, aborted, preempted) are free again: the
        calls that wrote them were dispatched before any call of this step, so nothing reads them."""
        for seq in [s for s in self._slots if s.status is not Status.RUNNING]:
            self._free_slots.append(self._slots.pop(seq))

    # ---- host ----------------------------------------------------------------------------------

    def build(self, plan: StepPlan, sampling_of: SamplingOf) -> tuple[list[Call], dict[Sequence, Exception]]:
        """Every call of the step, and the requests dropped from it (with why)."""
        calls: list[Call] = []
        dropped: dict[Sequence, Exception] = {}
        self._release_slots()
        prefill_rows = []
        for chunk in plan.prefills:
            if chunk.seq.status is not Status.RUNNING:
                continue  # ended when the last step was read back, after this plan was made
            try:
                prefill_rows.append(self._row(chunk.seq, chunk.start, chunk.end, chunk.samples, sampling_of))
            except Exception as e:  # this request's fault: it leaves the step, the rest goes on
                dropped[chunk.seq] = e
        try:
            groups = self._prefill_groups(prefill_rows)
        except Exception as e:  # nothing has run: the prompts fail, the engine goes on
            groups = []
            dropped.update((row.seq, e) for row in prefill_rows)
        for placed, t, q in groups:
            self._isolated(placed, lambda g, t=t, q=q: self._prefill_call(g, t, q), lambda row: row.seq,
                           calls, dropped)
        rows, verify_rows = [], []
        drafts = dict(plan.drafts)
        for seq in plan.decodes:
            if seq.status is not Status.RUNNING:
                continue
            try:
                if seq in drafts:
                    verify_rows.append(self._verify_row(seq, drafts[seq], sampling_of))
                else:
                    rows.append(self._decode_row(seq, sampling_of))
            except Exception as e:
                dropped[seq] = e
        for b, placed in self._decode_groups(rows, self.buckets.decode_batch):
            p = Buckets.pick(self.buckets.context_pages, max(len(row.seq.pages) for _, row in placed))
            self._isolated(placed, lambda g, b=b, p=p: self._call("decode", g, b, 1, p), lambda item: item[1].seq,
                           calls, dropped)
        for b, placed in self._decode_groups(verify_rows, self.buckets.verify_batch):
            p = Buckets.pick(self.buckets.context_pages, max(len(row.seq.pages) for _, row in placed))
            self._isolated(placed, lambda g, b=b, p=p: self._verify_call(g, b, p), lambda item: item[1].seq,
                           calls, dropped)
        return calls, dropped

    @staticmethod
    def _isolated(items: list, make: Callable[[list], Call], seq_of, calls: list[Call],
                  dropped: dict[Sequence, Exception]) -> None:
        """Append make(items) to `calls`; when it cannot be built, find the requests that cannot be
        built alone (each on its own, host work only), drop them and build the rest. A fault no
        single request explains drops every request of the call."""
        try:
            calls.append(make(items))
            return
        except Exception as e:
            error = e
        rest = []
        for item in items:
            try:
                make([item])
                rest.append(item)
            except Exception as e:
                dropped[seq_of(item)] = e
        if len(rest) == len(items):  # no single request explains it
            dropped.update((seq_of(item), error) for item in items)
        elif rest:
            try:
                calls.append(make(rest))
            except Exception as e:
                dropped.update((seq_of(item), e) for item in rest)

    def _row(self, seq: Sequence, start: int, end: int, samples: bool, sampling_of: SamplingOf) -> _Row:
        params, seed, scores, held, matcher = sampling_of(seq)
        sampling = (params, seed, seq.total - seq.prompt_len, held) if samples else None
        # penalties look at every token before the one sampled: tokens[:end], never more
        history = seq.tokens[:end] if samples and params.penalized else None
        targets = None
        if scores and start < seq.prompt_len - 1:  # position p scores prompt token p + 1
            targets = np.full(end - start, -1, np.int32)
            stop = min(end, seq.prompt_len - 1)
            targets[:stop - start] = seq.tokens[start + 1:stop + 1]
        return _Row(seq, np.asarray(seq.tokens[start:end], np.int32), np.arange(start, end, dtype=np.int32),
                    sampling, history, targets, matcher if samples else None)

    def _context(self, row: _Row) -> int:
        """Pages a prefill row reads: its pages up to its chunk's end."""
        return math.ceil((int(row.positions[-1]) + 1) / self.page_size)

    def _prefill_groups(self, rows: list[_Row]) -> list[tuple[list[_Row], int, int]]:
        """Rows packed, in order, into calls within the largest buckets: ([row], T, Q) per call,
        T the smallest token bucket whose rows(T) holds them, Q the pages bucket of their contexts."""
        b = self.buckets
        t_max, q_max = b.prefill_tokens[-1], b.context_pages[-1]
        groups: list[list[_Row]] = []
        for row in rows:
            g = groups[-1] if groups else None
            if (g is None or sum(len(r.tokens) for r in g) + len(row.tokens) > t_max
                    or len(g) + 1 > b.rows(t_max) or sum(map(self._context, g)) + self._context(row) > q_max):
                groups.append([row])
            else:
                g.append(row)
        out = []
        for g in groups:
            n = sum(len(r.tokens) for r in g)
            t = next(t for t in b.prefill_tokens if t >= n and b.rows(t) >= len(g))
            pages = max(sum(map(self._context, g)), math.ceil(t / self.page_size))
            q = next((q for q in b.context_pages if q >= pages), b.context_pages[-1])  # see Buckets.shapes
            out.append((g, t, q))
        return out

    def _prefill_call(self, placed: list[_Row], t: int, q: int) -> Call:
        """Host arrays of one ragged prefill call; padding tokens write to the null page."""
        ps, r_count = self.page_size, self.buckets.rows(t)
        tokens = np.zeros((len(PREFILL_TOKEN_FIELDS), t), np.int32)
        tokens[2], tokens[4], tokens[5] = NULL_PAGE, -1, -1  # write pages, token rows, targets
        ctx = np.zeros((3, q), np.int32)
        ctx[0], ctx[1] = NULL_PAGE, -1  # pages, rows
        row_ints = np.zeros((r_count, PREFILL_ROW_INTS + SamplingBatch.INTS), np.int32)
        row_ints[:, 2] = self.padding_slot
        floats = np.empty((r_count, SamplingBatch.FLOATS), np.float32)
        history = None
        sampling: list = [None] * r_count
        rows, scored = [], []
        at = c = 0
        for r, row in enumerate(placed):
            n, seq = len(row.tokens), row.seq
            pages = np.asarray(seq.pages, np.int32)
            span = slice(at, at + n)
            tokens[0, span] = row.tokens
            tokens[1, span] = row.positions
            tokens[2, span] = pages[row.positions // ps]
            tokens[3, span] = row.positions % ps
            tokens[4, span] = r
            k = self._context(row)
            ctx[0, c:c + k] = pages[:k]
            ctx[1, c:c + k] = r
            ctx[2, c:c + k] = np.arange(k)
            row_ints[r, :PREFILL_ROW_INTS] = (at + n - 1, seq.prompt_len,
                                              self.padding_slot if row.sampling is None else self.slot(seq))
            sampling[r] = row.sampling
            if row.history is not None:
                if history is None:
                    history = np.full((r_count, q * ps), -1, np.int32)
                history[r, :len(row.history)] = row.history
            if row.sampling is not None:
                rows.append((r, seq))
            if row.targets is not None:
                tokens[5, span] = row.targets
                scored.append(((0, at), seq, int(row.positions[0]), int((row.targets >= 0).sum())))
            at, c = at + n, c + k
        SamplingBatch.pack(sampling, r_count, row_ints[:, PREFILL_ROW_INTS:], floats)
        shape = ("prefill", r_count, t, q)
        batch = PrefillBatch(tokens, ctx, row_ints, floats, self._history(shape, history),
                             self._mask(shape, [(row.matcher, r) for r, row in enumerate(placed)]))
        return Call(shape, batch, tuple(rows), tuple(scored))

    def _decode_row(self, seq: Sequence, sampling_of: SamplingOf) -> _Row:
        """`_row` of one token, in plain tuples (a decode never scores its prompt: its position is
        at least the prompt's last)."""
        params, seed, _, held, matcher = sampling_of(seq)
        end = seq.num_computed + 1
        token = seq.tokens[end - 1] if end <= len(seq.tokens) else PENDING  # still on the device: read there
        return _Row(seq, (token,), (end - 1,), (params, seed, seq.total - seq.prompt_len, held),
                    seq.tokens[:end] if params.penalized else None, None, matcher)

    def _verify_row(self, seq: Sequence, draft: tuple[int, ...], sampling_of: SamplingOf) -> _Row:
        """A decode's row with its drafts: its last token (on the host: the engine read it back to
        propose) then the drafts. Only plain sampling speculates (the engine's `_speculating`)."""
        params, seed, *_ = sampling_of(seq)
        end = seq.num_computed + 1
        return _Row(seq, (seq.tokens[end - 1], *draft), (end - 1,), (params, seed, seq.total - seq.prompt_len, ()),
                    None, None)

    def _verify_call(self, placed: list[tuple[int, _Row]], b: int, p: int) -> Call:
        """Host arrays of one verify call; padding rows have no pages, so they write to the null page."""
        t = self.buckets.verify_tokens
        ints = np.empty((b, VERIFY_INTS + SamplingBatch.INTS), np.int32)
        ints[:, :VERIFY_INTS] = (0, 0, self.padding_slot)
        floats = np.empty((b, SamplingBatch.FLOATS), np.float32)
        tokens = np.full((b, t), -1, np.int32)
        tables = np.full((b, p), NULL_PAGE, np.int32)
        sampling = [None] * b
        for r, row in placed:
            seq = row.seq
            ints[r, :VERIFY_INTS] = (row.positions[0], len(row.tokens) - 1, self.slot(seq))
            tokens[r, :len(row.tokens)] = row.tokens
            tables[r, :len(seq.pages)] = seq.pages
            sampling[r] = row.sampling
        SamplingBatch.pack(sampling, b, ints[:, VERIFY_INTS:], floats)
        return Call(("verify", b, t, p), VerifyBatch(ints, floats, tokens, tables), tuple((r, row.seq) for r, row in placed))

    def _decode_groups(self, rows: list[_Row], sizes: tuple[int, ...]) -> list[tuple[int, list[tuple[int, _Row]]]]:
        """`rows` placed into calls of batch buckets `sizes`: (batch bucket, [(row index, row)]) per
        call. Rows [r·b/R, (r+1)·b/R) are replica r's; a replica with more requests than the
        largest bucket spills into a further call."""
        if not rows:
            return []
        R = self.replicas
        by_replica: list[list[_Row]] = [[] for _ in range(R)]
        for row in rows:
            by_replica[self.kv.replica_of(row.seq)].append(row)
        cap = sizes[-1] // R
        placed = []
        while any(by_replica):
            groups = [g[:cap] for g in by_replica]
            by_replica = [g[cap:] for g in by_replica]
            b = Buckets.pick(sizes, R * max(len(g) for g in groups))
            placed.append((b, [(r * (b // R) + i, row) for r, g in enumerate(groups) for i, row in enumerate(g)]))
        return placed

    def _call(self, family: str, placed: list[tuple[int, _Row]], b: int, t: int, p: int) -> Call:
        """Host arrays of one decode call; padding rows write to the null page, read nothing."""
        ps = self.page_size
        ints = np.empty((b, DECODE_INTS + SamplingBatch.INTS), np.int32)
        floats = np.empty((b, SamplingBatch.FLOATS), np.float32)
        sampling = [None] * b
        ints[:, :DECODE_INTS] = (0, 0, NULL_PAGE, 0, 0, self.padding_slot)
        tables = np.full((b, p), NULL_PAGE, np.int32)
        history = None
        for r, row in placed:
            seq, position = row.seq, int(row.positions[0])
            ints[r, :DECODE_INTS] = (row.tokens[0], position, seq.pages[position // ps], position % ps, seq.prompt_len,
                                     self.slot(seq))  # a PENDING token is read from the slot
            tables[r, :len(seq.pages)] = seq.pages
            sampling[r] = row.sampling
            if row.history is not None:
                if history is None:
                    history = np.full((b, p * ps), -1, np.int32)
                history[r, :len(row.history)] = row.history
        SamplingBatch.pack(sampling, b, ints[:, DECODE_INTS:], floats)
        shape = ("decode", b, t, p)
        batch = DecodeBatch(ints, floats, tables, self._history(shape, history),
                            self._mask(shape, [(row.matcher, r) for r, row in placed]))
        rows = tuple((r, row.seq) for r, row in placed if row.sampling is not None)
        return Call((family, b, t, p), batch, rows)

    def _history(self, shape, history: np.ndarray | None):
        """`history`, or when no row of the call is penalized an all -1 array made once per shape
        and kept on the device (in one process), so the call sends nothing for it: at batch 64 and
        2,048 positions that is 512 KiB a step the host no longer copies."""
        if history is not None:
            return history
        if shape not in self._no_history:
            rows, width = shape[1], shape[3] * self.page_size
            empty = np.full((rows, width), -1, np.int32)
            empty.flags.writeable = False
            if jax.process_count() == 1:
                sharding = self.programs.batch_shardings.get(shape)
                empty = self._device_array(empty, sharding.history if sharding is not None else None)
            self._no_history[shape] = empty
        return self._no_history[shape]

    def _mask(self, shape, rows: list[tuple[Any, int]]):
        """The call's token mask: its constrained rows' filled by their matchers (GrammarError when
        one cannot go on: that request leaves the step), every other row all allowed; a call with no
        constrained row takes an all-allowed mask kept on the device, as `_history`'s."""
        rows = [(matcher, r) for matcher, r in rows if matcher is not None]
        if rows:
            mask = all_allowed(shape[1], self.mask_words)
            fill_masks(self.grammars, rows, mask)
            return mask
        if shape not in self._all_allowed:
            every = all_allowed(shape[1], self.mask_words)
            every.flags.writeable = False
            if jax.process_count() == 1:
                sharding = self.programs.batch_shardings.get(shape)
                every = self._device_array(every, sharding.mask if sharding is not None else None)
            self._all_allowed[shape] = every
        return self._all_allowed[shape]

    # ---- device --------------------------------------------------------------------------------

    def run(self, params, pool: KVPool, calls: list[Call]) -> tuple[KVPool, list]:
        """Dispatch every call back to back (no host sync between them); returns the new pool and
        each call's (call, Sampled, Scored, routing) on the device. The pool and `last` are donated: an
        exception here leaves them unknown."""
        launched = []
        for call in calls:
            batch = call.batch
            if jax.process_count() > 1:  # every process holds the same host batch: give each its shards
                batch = jax.tree.map(
                    lambda host, sharding: jax.make_array_from_callback(host.shape, sharding,
                                                                        lambda i: host[i]),
                    batch, self.programs.batch_shardings[call.shape])
            pool, self.last, sampled, scored, routing = self.programs.compiled[call.shape](params, pool, self.last,
                                                                                          batch)
            launched.append((call, sampled, scored, routing))
        return pool, launched
