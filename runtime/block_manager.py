"""Page bookkeeping for the paged KV cache. Plain Python: no JAX here.

Pages carry reference counts so several requests may share one (prefix caching); a page returns to
the free list when its count drops to zero.

With data parallelism the pool is split into `replicas` equal ranges, one per data replica (the
pool's page axis is sharded over the `data` mesh axis), and all pages of a request come from one
range, so attention never reads across replicas. The first page of each range is that replica's
null page, never handed out; page 0 (NULL_PAGE) is replica 0's.
"""

from __future__ import annotations

from collections import deque

NULL_PAGE = 0


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, replicas: int = 1):
        if replicas < 1 or num_pages % replicas:
            raise ValueError(f"num_pages ({num_pages}) must be a multiple of replicas ({replicas})")
        if num_pages // replicas < 2:
            raise ValueError(f"need >= 2 pages per replica (the first is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.replicas = replicas
        self.pages_per_replica = n = num_pages // replicas
        self._free: list[deque[int]] = [deque(range(r * n + 1, (r + 1) * n)) for r in range(replicas)]
        self._refs = [0] * num_pages

    @property
    def num_usable(self) -> int:
        return self.num_pages - self.replicas

    @property
    def num_free(self) -> int:
        return sum(len(f) for f in self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def replica_of(self, page: int) -> int:
        return page // self.pages_per_replica

    def null_page(self, replica: int) -> int:
        return replica * self.pages_per_replica

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` in place to hold `num_tokens` tokens, from the replica it already uses (a new
        table goes to the replica with the most free pages). All or nothing: False (and `table`
        untouched) when too few pages are free there."""
        need = self.pages_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if table:
            free = self._free[self.replica_of(table[0])]
        else:
            free = max(self._free, key=len)
        if need > len(free):
            return False
        for _ in range(need):
            page = free.popleft()
            self._refs[page] = 1
            table.append(page)
        return True

    def share(self, pages: list[int]) -> None:
        for page in pages:
            if self._refs[page] <= 0:
                raise ValueError(f"page {page} is not allocated")
            self._refs[page] += 1

    def release(self, table: list[int]) -> None:
        """Drop one reference to each page of `table` and empty it."""
        for page in table:
            if self._refs[page] <= 0:
                raise ValueError(f"page {page} released more often than allocated")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free[self.replica_of(page)].append(page)
        table.clear()

    def ref_count(self, page: int) -> int:
        return self._refs[page]
