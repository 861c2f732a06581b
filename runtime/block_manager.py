"""Page bookkeeping for the paged KV cache: the pool's free lists, reference counts and prefix index.
Plain Python: no JAX here. Tables go in and come back out (never edited in place); the one owner of
which pages a request holds is runtime/kv_manager.py.

Pages carry reference counts so several requests may share one; a page returns to the pool when its
count drops to zero.

Prefix caching: a full page is known by a hash chained over its parent page's hash and its own token
ids (salted by the model), so equal hashes mean equal prefixes. A new request takes every cached
page of its longest cached prefix (`lookup`, then `share`) and computes only the rest. A cached page
nobody references waits on an LRU list: reused if its prefix comes back, evicted (oldest first) only
when no never-cached page is free.

With data parallelism the pool is split into `replicas` equal ranges, one per data replica (the
pool's page axis is sharded over the `data` mesh axis), and all pages of a request come from one
range, so attention never reads across replicas. The first page of each range is that replica's
null page, never handed out; page 0 (NULL_PAGE) is replica 0's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Sequence

import numpy as np

NULL_PAGE = 0


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a full page: its parent's hash (or the salt, for the first page) and its tokens."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, replicas: int = 1, prefix_caching: bool = False):
        if replicas < 1 or num_pages % replicas:
            raise ValueError(f"num_pages ({num_pages}) must be a multiple of replicas ({replicas})")
        if num_pages // replicas < 2:
            raise ValueError(f"need >= 2 pages per replica (the first is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.replicas = replicas
        self.prefix_caching = prefix_caching
        self.pages_per_replica = n = num_pages // replicas
        self._free: list[deque[int]] = [deque(range(r * n + 1, (r + 1) * n)) for r in range(replicas)]
        self._lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]  # cached, unused
        self._refs = [0] * num_pages
        self._hash_of: dict[int, bytes] = {}
        self._page_of: list[dict[bytes, int]] = [{} for _ in range(replicas)]
        self.evictions = 0
        self.keep_evicted = False  # record evicted cached pages for a lower tier to copy out
        self._evicted: list[tuple[int, bytes]] = []
        self.events = None  # a KVEvents log, when someone listens

    @property
    def num_usable(self) -> int:
        return self.num_pages - self.replicas

    @property
    def num_free(self) -> int:
        """Pages a request could take now (never-cached ones and unreferenced cached ones)."""
        return sum(len(f) + len(c) for f, c in zip(self._free, self._lru))

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def replica_of(self, page: int) -> int:
        return page // self.pages_per_replica

    def null_page(self, replica: int) -> int:
        return replica * self.pages_per_replica

    def _available(self, replica: int) -> int:
        return len(self._free[replica]) + len(self._lru[replica])

    def _take(self, replica: int) -> int:
        if self._free[replica]:
            return self._free[replica].popleft()
        page, _ = self._lru[replica].popitem(last=False)  # evict the least recently used cached page
        self._forget(page)
        return page

    def _forget(self, page: int) -> None:
        page_hash = self._hash_of.pop(page)
        del self._page_of[self.replica_of(page)][page_hash]
        self.evictions += 1
        if self.events is not None:
            self.events.add("removed", "device", page_hash, replica=self.replica_of(page))
        if self.keep_evicted:
            self._evicted.append((page, page_hash))

    def cached_hashes(self) -> list[bytes]:
        """Hashes of every page registered in the prefix cache (referenced or not)."""
        return list(self._hash_of.values())

    def take_evicted(self) -> list[tuple[int, bytes]]:
        """Cached pages evicted since the last call, (page, hash): their data is still in the pool
        until the next program writes the pages."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def evict_all_cached(self) -> int:
        """Evict every unreferenced cached page (to a lower tier, if one listens); returns how many."""
        n = 0
        for replica, lru in enumerate(self._lru):
            while lru:
                page, _ = lru.popitem(last=False)
                self._forget(page)
                self._free[replica].append(page)
                n += 1
        return n

    def grow(self, table: Sequence[int], num_tokens: int) -> list[int] | None:
        """`table` extended to hold `num_tokens` tokens, as a new list, from the replica it already
        uses (a new table goes to the replica with the most pages available). All or nothing: None
        (and nothing taken) when too few pages are available there."""
        need = self.pages_for(num_tokens) - len(table)
        if need <= 0:
            return list(table)
        replica = self.replica_of(table[0]) if table else max(range(self.replicas), key=self._available)
        if need > self._available(replica):
            return None
        grown = list(table)
        for _ in range(need):
            page = self._take(replica)
            self._refs[page] = 1
            grown.append(page)
        return grown

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `hashes` held by one replica (not yet shared)."""
        best: list[int] = []
        for index in self._page_of:
            pages = []
            for h in hashes:
                page = index.get(h)
                if page is None:
                    break
                pages.append(page)
            if len(pages) > len(best):
                best = pages
        return best

    def share(self, pages: list[int]) -> None:
        for page in pages:
            if self._refs[page] == 0:
                if page not in self._hash_of:
                    raise ValueError(f"page {page} is not allocated")
                del self._lru[self.replica_of(page)][page]  # back in use
            self._refs[page] += 1

    def register(self, page: int, page_hash: bytes, parent: bytes | None = None,
                 tokens: Sequence[int] | None = None) -> None:
        """`page` is full and holds the prefix `page_hash` names (after the page `parent` names, None
        for a first page; `tokens` its token ids, for the events): make it findable. A prefix
        already cached on another page keeps that page."""
        replica = self.replica_of(page)
        index = self._page_of[replica]
        if page_hash not in index and page not in self._hash_of:
            index[page_hash] = page
            self._hash_of[page] = page_hash
            if self.events is not None:
                self.events.add("stored", "device", page_hash, parent,
                                None if tokens is None else tuple(tokens), replica)

    def release(self, table: Sequence[int]) -> None:
        """Drop one reference to each page of `table` (the caller forgets the table)."""
        for page in reversed(table):  # a prefix's tail is evicted before its head
            if self._refs[page] <= 0:
                raise ValueError(f"page {page} released more often than allocated")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._lru[self.replica_of(page)][page] = None
                else:
                    self._free[self.replica_of(page)].append(page)

    def ref_count(self, page: int) -> int:
        return self._refs[page]
