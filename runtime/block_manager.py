"""Page bookkeeping for the paged KV cache. Plain Python: no JAX here.

Pages carry reference counts so several requests may share one (prefix caching); a page returns to
the free list when its count drops to zero. Page 0 (the null page) is never handed out.
"""

from __future__ import annotations

from collections import deque

NULL_PAGE = 0


class BlockManager:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(1, num_pages))
        self._refs = [0] * num_pages

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` in place to hold `num_tokens` tokens. All or nothing: False (and `table`
        untouched) when too few pages are free."""
        need = self.pages_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            page = self._free.popleft()
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
                self._free.append(page)
        table.clear()

    def ref_count(self, page: int) -> int:
        return self._refs[page]
