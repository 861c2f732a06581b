"""Lower tiers of the prefix cache: pages evicted from device memory live on in host memory.

    device pool ──evict (async copy out)──▶ HostTier (bounded, LRU) ──▶ (dropped)
         ▲                                      │
         └──────── onboard (batched copy in) ◀──┘  when a new request's prefix is found here

A page is stored whole, keys and values of every layer: [2·layers, page_size, kv_heads, head_dim]
(an int8 / fp8 pool's as bytes, head_dim codes and a scale per token and kv head: KVPool.page_shape),
keyed by the same chained hash that names it on the device. Copies run in fixed batches of
`TRANSFER_PAGES` pages through two small compiled programs, so serving never compiles.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from meshserve.runtime.kv_cache import KVPool

log = logging.getLogger("meshserve.kv")

TRANSFER_PAGES = 8  # pages per copy program call (padding rows read/write the null page)


def _gather(pool: KVPool, pages):
    """[M, 2L, S, K, E] (KVPool.page_shape); a quantized pool's as bytes, each token's codes then its
    scale exponent ([..., E + 1] uint8)."""
    if not pool.quantized:
        return jnp.stack([layer[pages] for layer in pool.k + pool.v], axis=1)
    as_bytes = lambda x: lax.bitcast_convert_type(x, jnp.uint8)
    return jnp.stack([jnp.concatenate([as_bytes(codes[pages]), as_bytes(exps[pages])[..., None]], axis=-1)
                      for codes, exps in zip(pool.k + pool.v, pool.k_exp + pool.v_exp)], axis=1)


def _scatter(pool: KVPool, pages, data):
    L = len(pool.k)
    if not pool.quantized:
        k = tuple(layer.at[pages].set(data[:, i].astype(layer.dtype)) for i, layer in enumerate(pool.k))
        v = tuple(layer.at[pages].set(data[:, L + i].astype(layer.dtype)) for i, layer in enumerate(pool.v))
        return KVPool(k, v)
    put = lambda layer, x: layer.at[pages].set(lax.bitcast_convert_type(x, layer.dtype))
    codes = [put(layer, data[:, i, ..., :-1]) for i, layer in enumerate(pool.k + pool.v)]
    exps = [put(layer, data[:, i, ..., -1]) for i, layer in enumerate(pool.k_exp + pool.v_exp)]
    return KVPool(tuple(codes[:L]), tuple(codes[L:]), tuple(exps[:L]), tuple(exps[L:]))


class KVEvent(NamedTuple):
    seq: int  # 1, 2, …: a gap means the consumer fell behind and lost events
    kind: str  # "stored" | "removed"
    tier: str  # "device" | "host" | "store"
    page_hash: bytes
    # on a page the device stored: the hash of the page before it (None: the first page), its token
    # ids and its data replica, which a router needs to follow the prefix (lower tiers only copy
    # pages the device had, so they carry the hash alone)
    parent: bytes | None = None
    tokens: tuple[int, ...] | None = None
    replica: int = 0


class KVEvents:
    """What happened to cached pages, per tier, for a KV-aware router to follow. Bounded: a
    consumer that falls behind loses the oldest events (and sees the gap in sequence numbers)."""

    def __init__(self, maxlen: int = 65536):
        from collections import deque

        self._events: deque = deque(maxlen=maxlen)
        self._seq = 0

    def add(self, kind: str, tier: str, page_hash: bytes, parent: bytes | None = None,
            tokens: tuple[int, ...] | None = None, replica: int = 0) -> None:
        self._seq += 1
        self._events.append(KVEvent(self._seq, kind, tier, page_hash, parent, tokens, replica))

    def drain(self) -> list[KVEvent]:
        events = list(self._events)
        self._events.clear()
        return events


class HostTier:
    """Pages in host memory, least recently used dropped first when over `capacity_bytes`."""

    def __init__(self, capacity_bytes: int, page_bytes: int, events: KVEvents | None = None):
        self.capacity = max(0, capacity_bytes // page_bytes)  # pages
        self._pages: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.stored = self.dropped = 0
        self.events = events

    def __contains__(self, page_hash: bytes) -> bool:
        return page_hash in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def put(self, page_hash: bytes, data: np.ndarray) -> list[tuple[bytes, np.ndarray]]:
        """Store a page; returns the pages dropped to make room (oldest first)."""
        if self.capacity == 0:
            return [(page_hash, data)]
        self._pages[page_hash] = data
        self._pages.move_to_end(page_hash)
        self.stored += 1
        dropped = []
        while len(self._pages) > self.capacity:
            dropped.append(self._pages.popitem(last=False))
            self.dropped += 1
        if self.events is not None:
            self.events.add("stored", "host", page_hash)
            for h, _ in dropped:
                self.events.add("removed", "host", h)
        return dropped

    def get(self, page_hash: bytes) -> np.ndarray:
        self._pages.move_to_end(page_hash)
        return self._pages[page_hash]

    def items(self):
        return list(self._pages.items())


class PageMover:
    """Copies pages between the device pool and a host tier, in batches."""

    def __init__(self, pool: KVPool, tier: "LowerTiers | None", null_page: int = 0):
        self.tier = tier
        self.null_page = null_page
        self.page_shape = pool.page_shape
        self._shape = (TRANSFER_PAGES, *pool.page_shape)
        self._dtype = pool.page_dtype
        idx = jax.ShapeDtypeStruct((TRANSFER_PAGES,), jnp.int32)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), pool)
        self._gather = jax.jit(_gather).lower(abstract, idx).compile()
        self._scatter = jax.jit(_scatter, donate_argnums=(0,), out_shardings=jax.tree.map(
            lambda a: a.sharding, pool)).lower(abstract, idx, jax.ShapeDtypeStruct(self._shape, self._dtype)).compile()
        # where `scatter` wants its data: pages made elsewhere (another engine's devices, another
        # tensor split) are laid out like this pool's first
        self._data_sharding = self._scatter.input_shardings[0][2]
        self._pending: list[tuple[list[bytes], jax.Array]] = []
        self.pages_out = self.pages_in = 0

    def _batches(self, items):
        for i in range(0, len(items), TRANSFER_PAGES):
            yield items[i:i + TRANSFER_PAGES]

    def _index(self, pages: list[int]) -> np.ndarray:
        idx = np.full(TRANSFER_PAGES, self.null_page, np.int32)
        idx[:len(pages)] = pages
        return idx

    def gather(self, pool: KVPool, pages: list[int]) -> jax.Array:
        """Up to TRANSFER_PAGES pages as one device array [TRANSFER_PAGES, 2·layers, …] (a copy:
        later programs may overwrite the pages)."""
        return self._gather(pool, self._index(pages))

    def scatter(self, pool: KVPool, pages: list[int], data: jax.Array) -> KVPool:
        """Write `data` ([TRANSFER_PAGES, …], on the pool's device) into `pages` (padded with the
        null page, which takes the rows not wanted); returns the new pool."""
        return self._scatter(pool, self._index(pages), jax.device_put(data, self._data_sharding))

    def offload(self, pool: KVPool, evicted: list[tuple[int, bytes]]) -> None:
        """Start copying evicted pages out (before anything overwrites them: this is dispatched
        ahead of the step that reuses the pages). `finish_offload` files them."""
        for batch in self._batches(evicted):
            data = self._gather(pool, self._index([p for p, _ in batch]))
            data.copy_to_host_async()
            self._pending.append(([h for _, h in batch], data))

    def finish_offload(self) -> None:
        for hashes, data in self._pending:
            host = np.asarray(data)
            for i, h in enumerate(hashes):
                self.tier.put(h, host[i].copy())
            self.pages_out += len(hashes)
        self._pending.clear()
        self.tier.flush()

    def onboard(self, pool: KVPool, loads: list[tuple[int, np.ndarray]]) -> KVPool:
        """Write pages read from the lower tier, (device page, data), into the pool (batched);
        returns the new pool."""
        for batch in self._batches(loads):
            data = np.zeros(self._shape, self._dtype)
            for i, (_, page) in enumerate(batch):
                data[i] = page
            pool = self._scatter(pool, self._index([p for p, _ in batch]), data)
            self.pages_in += len(batch)
        return pool


class StoreTier:
    """Pages in a tensorstore kvstore (tier 3): by default a folder (`file` driver); any kvstore spec
    (`memory://`, `gs://…`, `s3://…`) works. One key per page, named by its hash, so the store is its
    own index: a restarted server lists it and finds its pages again, and two servers writing the same
    page write the same bytes (each write replaces the value whole). Page hashes are salted with the
    model's fingerprint (runtime/identity.py), so another model never looks up this one's pages. A
    value is a header (magic, dtype, shape, blake2b checksum of the data) and the data; anything that
    does not check out — flipped bytes, a truncated or missing value, a page of another shape or
    dtype than this engine's — is a miss, counted, logged (at most one line per `WARN_EVERY_S`), and
    recomputed. A failed write (a full disk) turns the tier off with a warning; serving goes on.

    With `capacity_bytes` the store holds at most that many bytes of pages (whole values, header
    included): past it, the least recently used page (written or read) is deleted. Pages found at
    open count from the start, as the least recent, in the order listed. Several servers may share
    one store; each keeps its own capacity, and a page another one deleted is a miss here.
    """

    MAGIC = b"MSKV1"
    WARN_EVERY_S = 60.0

    def __init__(self, spec: str | dict, page_shape: tuple[int, ...], page_dtype, prefix: str = "kv/",
                 events: KVEvents | None = None, capacity_bytes: int | None = None):
        import tensorstore as ts

        self.events = events
        self.page_shape, self.page_dtype = tuple(page_shape), np.dtype(page_dtype)
        self.value_bytes = self.header_bytes(len(page_shape)) + int(np.prod(page_shape)) * self.page_dtype.itemsize
        self.capacity = None if capacity_bytes is None else capacity_bytes // self.value_bytes  # pages
        if isinstance(spec, str) and "://" not in spec:
            spec = {"driver": "file", "path": spec.rstrip("/") + "/"}
        self._kv = ts.KvStore.open(spec).result()
        self._prefix = prefix
        # its keys (page hashes in hex), least recently used first
        self._keys: OrderedDict[str, None] = OrderedDict.fromkeys(
            k.decode()[len(prefix):] for k in self._kv.list().result() if k.startswith(prefix.encode()))
        self._writes: list = []
        self.enabled = True
        self.stored = self.hits = self.misses = self.evicted = self.rewritten = 0
        self._unreported, self._warned_at = 0, -self.WARN_EVERY_S
        self._evict()

    def holds(self, page_hash: bytes) -> bool:
        """Whether the store's index (its keys, listed at open) names the page; reads nothing."""
        return self.enabled and page_hash.hex() in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def header_bytes(ndim: int) -> int:
        """A stored value's bytes before its data: magic, dtype, ndim, shape, checksum."""
        return 5 + 8 + 8 + 8 * ndim + 16

    @classmethod
    def encode(cls, data: np.ndarray) -> bytes:
        data = np.ascontiguousarray(data)
        body = data.tobytes()
        return (cls.MAGIC + data.dtype.str.encode().ljust(8) + np.int64(data.ndim).tobytes()
                + np.asarray(data.shape, np.int64).tobytes() + hashlib.blake2b(body, digest_size=16).digest() + body)

    @classmethod
    def decode(cls, raw: bytes) -> np.ndarray:
        """The page, or ValueError when the value is not one whole, unchanged page."""
        if raw[:5] != cls.MAGIC or len(raw) < 21:
            raise ValueError("not a page")
        dtype = np.dtype(raw[5:13].decode().strip())
        ndim = int(np.frombuffer(raw[13:21], np.int64)[0])
        if not 0 < ndim < 8:
            raise ValueError("bad header")
        at = 21 + 8 * ndim
        shape = tuple(int(n) for n in np.frombuffer(raw[21:at], np.int64))
        checksum, body = raw[at:at + 16], raw[at + 16:]
        if len(body) != int(np.prod(shape)) * dtype.itemsize or hashlib.blake2b(body, digest_size=16).digest() != checksum:
            raise ValueError("checksum")
        return np.frombuffer(body, dtype).reshape(shape).copy()

    def put(self, page_hash: bytes, data: np.ndarray, replace: bool = False) -> None:
        """Write a page (not one the store already names, unless `replace`); written by `flush`."""
        key = page_hash.hex()
        if not self.enabled or (key in self._keys and not replace):
            return
        self._writes.append((page_hash, self._kv.write(self._prefix + key, self.encode(data))))
        self._touch(page_hash)

    def flush(self) -> int:
        """Wait for the writes in flight, then delete the least recently used pages past the
        capacity; returns how many writes succeeded. A failed write disables the tier."""
        done = 0
        for page_hash, future in self._writes:
            try:
                future.result()
                self.stored += 1
                done += 1
                if self.events is not None:
                    self.events.add("stored", "store", page_hash)
            except Exception as e:  # a full disk, a lost bucket
                self._keys.pop(page_hash.hex(), None)
                if self.enabled:
                    log.warning("KV store tier disabled: a write failed: %s", e)
                self.enabled = False
        self._writes.clear()
        self._evict()
        return done

    def _touch(self, page_hash: bytes) -> None:
        """Index the page as the most recently used."""
        self._keys[page_hash.hex()] = None
        self._keys.move_to_end(page_hash.hex())

    def _evict(self) -> None:
        if self.capacity is None or len(self._keys) <= self.capacity:
            return
        deletes = []
        while len(self._keys) > self.capacity:
            key, _ = self._keys.popitem(last=False)
            deletes.append(self._kv.write(self._prefix + key, None))
            self.evicted += 1
            if self.events is not None:
                self.events.add("removed", "store", bytes.fromhex(key))
        for future in deletes:
            try:
                future.result()
            except Exception as e:  # left behind: found at the next open, and evicted then
                log.warning("KV store: deleting an evicted page failed: %s", e)

    def read(self, page_hash: bytes) -> np.ndarray:
        """The page as stored; ValueError (or the store's error) when it is not this engine's whole page."""
        raw = self._kv.read(self._prefix + page_hash.hex()).result().value
        data = self.decode(raw)
        if data.shape != self.page_shape or data.dtype != self.page_dtype:
            raise ValueError(f"a page of {data.dtype}{list(data.shape)}, not this engine's")
        return data

    def get(self, page_hash: bytes) -> np.ndarray | None:
        """The page, or None (a counted, logged miss) when it is missing or fails its checks."""
        self.flush()
        try:
            data = self.read(page_hash)
        except Exception as e:
            self._keys.pop(page_hash.hex(), None)
            self.misses += 1
            self._report(page_hash, e)
            if self.events is not None:
                self.events.add("removed", "store", page_hash)
            return None
        self.hits += 1
        self._touch(page_hash)  # named here now, if another server wrote it after this one opened
        return data

    def _report(self, page_hash: bytes, error: Exception) -> None:
        """Log store pages that failed their checks: one line per WARN_EVERY_S at most, with the count."""
        self._unreported += 1
        now = time.monotonic()
        if now - self._warned_at >= self.WARN_EVERY_S:
            log.warning("KV store: %d page(s) could not be read and are recomputed (the latest, %s…: %s)",
                        self._unreported, page_hash.hex()[:16], str(error) or type(error).__name__)
            self._unreported, self._warned_at = 0, now

    def verify(self, pages: list[tuple[bytes, np.ndarray]]) -> int:
        """Make the store hold each of `pages` whole: read what it holds for each, rewrite the ones
        missing or damaged, then read those back; returns how many of `pages` it holds verified."""
        def whole(page_hash, data):
            try:
                return np.array_equal(self.read(page_hash), data)
            except Exception:
                return False

        good, bad = [], []
        for h, data in pages:
            (good if whole(h, data) else bad).append((h, data))
        for h, _ in good:  # persisted now: the most recent
            self._touch(h)
        for h, data in bad:
            self.put(h, data, replace=True)
        self.flush()
        self.rewritten += len(bad)
        return sum(h.hex() in self._keys for h, _ in good) + sum(whole(h, data) for h, data in bad)


class LowerTiers:
    """Host memory, then optionally the store, as one lower tier for the KV manager and PageMover.

    `holds` answers from the tiers' indexes alone (the host's pages, the store's keys): the KV
    manager plans copies in by it and never waits on a store. `read` fetches a page in the engine's
    copy phase and checks a store page then; one that fails is a miss (None), and the request that
    wanted it computes it. Pages the host drops go to the store (or every page, with `write_through`)."""

    def __init__(self, host: HostTier, store: StoreTier | None = None, write_through: bool = False):
        self.host, self.store, self.write_through = host, store, write_through
        self.host_hits = self.store_hits = 0
        self._persisting: list | None = None  # pages bound for the store while persisting (verified there)

    def holds(self, page_hash: bytes) -> bool:
        return page_hash in self.host or (self.store is not None and self.store.holds(page_hash))

    def read(self, page_hash: bytes) -> np.ndarray | None:
        if page_hash in self.host:
            self.host_hits += 1
            return self.host.get(page_hash)
        data = self.store.get(page_hash) if self.store is not None else None
        if data is not None:
            self.store_hits += 1
        return data

    def put(self, page_hash: bytes, data: np.ndarray) -> None:
        dropped = self.host.put(page_hash, data)
        if self.store is not None:
            for h, d in [(page_hash, data)] * self.write_through + dropped:
                if self._persisting is not None:
                    self._persisting.append((h, d))
                else:
                    self.store.put(h, d)

    def flush(self) -> None:
        if self.store is not None:
            self.store.flush()

    def persist(self, push_down) -> int:
        """Write every cached page to the store (at shutdown, so a restart finds them), verified: a
        page the store holds damaged (or lost) is written again and read back. `push_down()` first
        moves the device's cached pages into these tiers; those it passes on to the store are
        verified too, not trusted by name. Returns how many of the pages the store holds whole."""
        if self.store is None or not self.store.enabled:
            push_down()
            return 0
        self._persisting = []
        try:
            push_down()
            pages = dict([*self._persisting, *self.host.items()])
        finally:
            self._persisting = None
        return self.store.verify(list(pages.items()))


def lower_tiers(config, pool: KVPool, page_bytes: int, events: KVEvents | None) -> LowerTiers | None:
    """The lower tiers an engine config asks for (host memory, a store), or None; ConfigError when
    the store cannot be opened."""
    if not (config.host_kv_bytes or config.kv_store):
        return None
    store = None
    if config.kv_store:
        import os

        from meshserve.models.errors import ConfigError

        try:
            store = StoreTier(os.path.expanduser(config.kv_store), pool.page_shape, pool.page_dtype, events=events,
                              capacity_bytes=config.kv_store_bytes)
        except Exception as e:
            raise ConfigError(f"kv_store {config.kv_store!r} cannot be opened: {e}") from None
    return LowerTiers(HostTier(config.host_kv_bytes, page_bytes, events=events), store, config.kv_store_write_through)
