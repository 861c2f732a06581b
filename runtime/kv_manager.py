"""The one owner of page state: which pages a request holds, and what they are named. Plain Python:
no JAX, no I/O.

Per request it writes (and nothing else does)

    seq.pages           its page table: the pages holding its tokens' K/V, in order
    seq.page_hashes     the names of its full pages, each hash chained over the one before
    seq.num_registered  how many of those pages are findable in the prefix cache

over a BlockManager (free lists, reference counts, the prefix index). The scheduler asks it for room
(`allocate`), hands back what a request held (`free`), and after a step ran has its full pages named
and registered (`register`). For the engine's copy phase it lists the pages evicted since the last
step (to copy out to a lower tier) and the pages to copy in from one (`Onboard`, in the step plan);
it decides those from the lower tier's *index* only, so nothing here reads a store: a page whose
read then fails is given up (`onboard_failed`) and its request computes it instead.

Prefix caching: a full page is named by a hash chained over its parent's name and its tokens, from
the model's salt (so another model never matches). A request starting from scratch takes the cached
pages of its longest cached prefix, on the device and then in the lower tier; at least one token is
always left to compute (its logits give the next token).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence as Seq

from meshserve.models.config import ModelConfig
from meshserve.models.errors import ConfigError
from meshserve.runtime.block_manager import BlockManager, chain_hash


@dataclasses.dataclass(frozen=True, eq=False)
class Onboard:
    """Page `index` of `seq`'s table, `page`, is to be filled from the lower tier's copy of `page_hash`."""

    seq: object  # the scheduler's Sequence
    index: int
    page: int
    page_hash: bytes


@dataclasses.dataclass(frozen=True)
class ImportPlan:
    """Where another engine's pages of a prompt go: `targets[i]` takes the prompt's page `first + i`
    (the null page for one already held); `table` keeps them referenced until `finish_import`."""

    first: int
    end: int
    targets: tuple[int, ...]
    table: tuple[int, ...]
    hashes: tuple[bytes, ...]
    tokens: tuple[int, ...]
    held: int


@dataclasses.dataclass(frozen=True)
class Memory:
    """What one device of the mesh gives the engine: its allocator's limit (on a GPU, the
    gpu_memory_utilization share of the card: runtime/memory.py) and what is in use (the weights,
    once loaded). A CPU reports none: `host_available` (bytes) stands in."""

    limit: int | None
    in_use: int = 0
    host_available: int | None = None

    @classmethod
    def of(cls, device) -> "Memory":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return cls(int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0)))
        return cls(None, host_available=host_available_bytes())


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def activation_bytes(model: ModelConfig, max_num_batched_tokens: int) -> int:
    """An upper estimate of what a step's programs take beside the weights and the pool on one device:
    float32 logits and sampling buffers over the vocabulary, the hidden and MLP activations of the
    largest batch (with a mixture of experts: each token's k experts' activations, twice over for the
    grouped form's padding), and 512 MiB of scratch (library workspaces)."""
    per_token = 4 * (3 * model.vocab_size + 8 * model.hidden_size + 3 * model.intermediate_size
                     + 6 * model.num_experts_per_tok * model.moe_intermediate_size)
    return per_token * max_num_batched_tokens + (512 << 20)


def kv_budget(memory: Memory, model: ModelConfig, page_bytes: int, page_size: int, *, max_seq_len: int,
              max_num_seqs: int, max_num_batched_tokens: int, replicas: int, split: int) -> int:
    """The KV pool's bytes (over the whole mesh) when kv_cache_bytes is not given: on a device that
    reports its memory, what its limit leaves after the weights and the activations, times the devices
    the pool is split over; on a CPU, what max_num_seqs requests of max_seq_len take, at most a quarter
    of the host's available memory. ConfigError when the weights leave nothing."""
    if memory.limit is not None:
        free = memory.limit - memory.in_use - activation_bytes(model, max_num_batched_tokens)
        if free < 2 * page_bytes // max(split, 1):
            raise ConfigError(
                f"no device memory left for the KV cache: {memory.in_use / 2**30:.2f} GiB in use (the weights) and "
                f"~{activation_bytes(model, max_num_batched_tokens) / 2**30:.2f} GiB for activations of a "
                f"{memory.limit / 2**30:.2f} GiB limit; raise gpu_memory_utilization, use more devices "
                f"(tensor parallelism) or set kv_cache_bytes")
        return int(free) * split
    per_request = (math.ceil(max_seq_len / page_size) + 1) * page_bytes
    need = max_num_seqs * per_request + replicas * page_bytes
    if memory.host_available is None:
        return need
    return max(min(need, memory.host_available // 4), replicas * per_request)


def kv_pages(page_bytes: int, page_size: int, max_seq_len: int, replicas: int, budget: int) -> int:
    """Pages of a KV pool of `budget` bytes (each page `page_bytes` across every layer), split evenly
    over the data replicas; ConfigError when one replica could not hold one max_seq_len request (it
    would wait for pages forever) or the budget holds fewer than 2 pages."""
    num_pages = budget // page_bytes
    if num_pages < 2:
        raise ConfigError(f"kv_cache_bytes={budget} holds fewer than 2 pages of {page_bytes} bytes")
    num_pages -= num_pages % replicas  # each data replica owns an equal range of pages
    per_replica = num_pages // replicas - 1  # usable: the first page of each range is its null page
    if per_replica * page_size < max_seq_len:
        need = (math.ceil(max_seq_len / page_size) + 1) * replicas * page_bytes
        raise ConfigError(
            f"the KV cache holds {max(per_replica, 0) * page_size} tokens per data replica ({num_pages} pages of "
            f"{page_size} tokens{f' over {replicas} replicas' if replicas > 1 else ''}), fewer than max_seq_len "
            f"({max_seq_len}): one request could never fit; set kv_cache_bytes to at least {need} "
            f"or lower max_seq_len")
    return int(num_pages)


class KVManager:
    def __init__(self, num_pages: int, page_size: int, *, replicas: int = 1, prefix_caching: bool = False,
                 salt: bytes = b"", events=None, lower=None, onboard_page_cost: int = 2):
        self.blocks = BlockManager(num_pages, page_size, replicas, prefix_caching)
        self.blocks.events = events
        self.page_size = page_size
        self.salt = salt  # names the model: its pages never match another model's
        self.events = events  # a KVEvents log, when a router listens
        self.lower = lower  # the lower tiers' index (`lower.holds(hash)`), when there are any
        self.blocks.keep_evicted = lower is not None
        self.onboard_page_cost = onboard_page_cost  # step-budget tokens a page copied in counts for
        self._onboard: list[Onboard] = []
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache …
        self.prefix_hits = 0  # … and found on the device
        self.lower_hits = 0  # … and found in the lower tier

    # ---- what there is --------------------------------------------------------------------------

    @property
    def prefix_caching(self) -> bool:
        return self.blocks.prefix_caching

    @property
    def replicas(self) -> int:
        return self.blocks.replicas

    @property
    def num_usable(self) -> int:
        return self.blocks.num_usable

    @property
    def num_free(self) -> int:
        return self.blocks.num_free

    @property
    def num_used(self) -> int:
        return self.blocks.num_used

    @property
    def num_cached(self) -> int:
        return self.blocks.num_cached

    @property
    def evictions(self) -> int:
        return self.blocks.evictions

    def replica_of(self, seq) -> int | None:
        """The data replica whose pages `seq` holds (None: none yet)."""
        return self.blocks.replica_of(seq.pages[0]) if seq.pages else None

    def null_page(self, replica: int) -> int:
        return self.blocks.null_page(replica)

    def cached_hashes(self) -> list[bytes]:
        return self.blocks.cached_hashes()

    def prefix_hashes(self, tokens: Seq[int]) -> list[bytes]:
        """Names of the pages of `tokens` a request may take from the cache: every full page but one
        that holds the last token. Each chains its predecessor's, from the model's salt."""
        ps = self.page_size
        hashes, parent = [], self.salt
        for i in range((len(tokens) - 1) // ps):
            parent = chain_hash(parent, tokens[i * ps:(i + 1) * ps])
            hashes.append(parent)
        return hashes

    def held(self, tokens: Seq[int]) -> list[int]:
        """The device pages of the longest cached prefix of `tokens` (not taken)."""
        return self.blocks.lookup(self.prefix_hashes(tokens))

    # ---- a request's pages ----------------------------------------------------------------------

    def reuse_prefix(self, seq, budget: int) -> tuple[int, int]:
        """Give `seq` (holding nothing) the cached pages of its longest cached prefix: the device's,
        then pages the lower tier holds, to be copied in before the step (each costing
        `onboard_page_cost` of the step's budget: loading is cheaper than computing, not free).
        Returns (tokens found, budget used)."""
        ps = self.page_size
        hashes = self.prefix_hashes(seq.tokens)
        pages = self.blocks.lookup(hashes)
        self.prefix_queries += len(hashes) * ps
        if pages:
            self.blocks.share(pages)
            seq.pages, seq.page_hashes, seq.num_registered = list(pages), hashes[:len(pages)], len(pages)
            self.prefix_hits += len(pages) * ps
        found = len(pages) * ps
        if self.lower is None:
            return found, 0
        cost = self.onboard_page_cost
        coming = {o.page_hash for o in self._onboard}  # copied in for another request this step: not findable yet
        lower = []
        for h in hashes[len(pages):]:
            if (len(lower) + 1) * cost >= budget or h in coming or not self.lower.holds(h):
                break  # the rest is computed, or loaded in a later admission
            lower.append(h)
        if not lower:
            return found, 0
        table = self.blocks.grow(seq.pages, (len(pages) + len(lower)) * ps)
        if table is None:
            return found, 0  # no room to bring them in: compute instead
        for index in range(len(pages), len(table)):  # registered at commit, once copied in
            self._onboard.append(Onboard(seq, index, table[index], hashes[index]))
        seq.pages, seq.page_hashes = table, hashes[:len(table)]
        self.lower_hits += len(lower) * ps
        return len(table) * ps, len(lower) * cost

    def allocate(self, seq, num_tokens: int) -> bool:
        """Grow `seq`'s table to hold `num_tokens` (from the replica it uses; a new one from the
        replica with the most pages available). All or nothing."""
        if self.blocks.pages_for(num_tokens) <= len(seq.pages):
            return True  # room already (most decode steps)
        table = self.blocks.grow(seq.pages, num_tokens)
        if table is None:
            return False
        seq.pages = table
        return True

    def truncate(self, seq, num_tokens: int) -> None:
        """`seq` keeps the pages that hold its first `num_tokens` and gives back the rest (pages a
        speculative step took for drafts it rejected: never named, so simply freed)."""
        keep = self.blocks.pages_for(num_tokens)
        if keep < len(seq.pages):
            if keep < seq.num_registered:
                raise ValueError(f"request {seq.request_id}: truncating below its registered pages")
            self.blocks.release(seq.pages[keep:])
            seq.pages = seq.pages[:keep]

    def free(self, seq) -> None:
        """`seq` gives back every page it holds (a shared page stays with its other holders; a cached
        one waits on the LRU) and forgets their names; copies in planned for it are dropped."""
        if any(o.seq is seq for o in self._onboard):
            self._onboard = [o for o in self._onboard if o.seq is not seq]
        self.blocks.release(seq.pages)
        seq.pages, seq.page_hashes, seq.num_registered = [], [], 0

    def register(self, seq, num_computed: int) -> None:
        """After a step ran: name the pages holding `num_computed` tokens of `seq` in full and make
        them (and those copied in for it) findable in the prefix cache."""
        if not self.prefix_caching:
            return
        ps = self.page_size
        for i in range(len(seq.page_hashes), num_computed // ps):
            parent = seq.page_hashes[-1] if seq.page_hashes else self.salt
            seq.page_hashes.append(chain_hash(parent, seq.tokens[i * ps:(i + 1) * ps]))
        for i in range(seq.num_registered, len(seq.page_hashes)):
            self.blocks.register(seq.pages[i], seq.page_hashes[i], seq.page_hashes[i - 1] if i else None,
                                 seq.tokens[i * ps:(i + 1) * ps])
        seq.num_registered = len(seq.page_hashes)

    # ---- the step's copies ----------------------------------------------------------------------

    def take_onboard(self) -> tuple[Onboard, ...]:
        """Pages to copy in from the lower tier before this step's programs run."""
        onboard, self._onboard = tuple(self._onboard), []
        return onboard

    def take_evicted(self) -> list[tuple[int, bytes]]:
        """Cached pages evicted since the last call, (page, hash): their data is still in the pool
        until the next program writes the pages, so they are copied out first."""
        return self.blocks.take_evicted()

    def onboard_failed(self, seq, index: int) -> None:
        """Page `index` of `seq` could not be copied in: its names from there on are dropped (the pages
        stay allocated, to be computed)."""
        self.lower_hits -= (len(seq.page_hashes) - index) * self.page_size
        del seq.page_hashes[index:]
        seq.num_registered = min(seq.num_registered, index)

    def evict_all_cached(self) -> int:
        """Evict every unreferenced cached page (to the lower tier, if any, by take_evicted)."""
        return self.blocks.evict_all_cached()

    # ---- moving a prompt's pages between engines (runtime/kv_transfer.py) -------------------------

    def export_pages(self, tokens: Seq[int], skip: int = 0) -> tuple[list[bytes], list[int]]:
        """(names, device pages) of the prompt's cached pages from page `skip` on."""
        hashes = self.prefix_hashes(tokens)
        pages = self.blocks.lookup(hashes)[skip:]
        return hashes[skip:skip + len(pages)], pages

    def begin_import(self, tokens: Seq[int], first: int, hashes: Seq[bytes]) -> ImportPlan | None:
        """Room for another engine's pages `first`… of this prompt (named `hashes`); None when this
        engine holds them all already. ValueError (with why) when they are not this prompt's, start
        past what this engine holds, or do not fit."""
        own = self.prefix_hashes(tokens)
        end = first + len(hashes)
        if tuple(own[first:end]) != tuple(hashes):
            raise ValueError("the KV pages are not this prompt's")
        held = self.blocks.lookup(own)
        if len(held) < first:
            raise ValueError(f"the KV pages start at page {first}, but this engine holds only the prompt's "
                             f"first {len(held)}")
        if len(held) >= end:
            return None
        self.blocks.share(held)  # not evicted to make room for the pages that follow them
        table = self.blocks.grow(held, end * self.page_size)
        if table is None:
            self.blocks.release(held)
            raise ValueError(f"no room for {end - len(held)} KV pages")
        null = self.blocks.null_page(0)
        targets = tuple(table[i] if len(held) <= i < end else null for i in range(first, end))
        return ImportPlan(first, end, targets, tuple(table), tuple(own[:end]), tuple(tokens[:end * self.page_size]),
                          len(held))

    def finish_import(self, plan: ImportPlan, written: bool) -> int:
        """The pages were written (or not): name the new ones, let go of all; returns how many became
        findable (unreferenced: a request admitted next takes them, unless evicted first)."""
        ps = self.page_size
        if written:
            for i in range(plan.held, plan.end):
                self.blocks.register(plan.table[i], plan.hashes[i], plan.hashes[i - 1] if i else None,
                                     plan.tokens[i * ps:(i + 1) * ps])
        self.blocks.release(plan.table)
        return plan.end - plan.held if written else 0

    def describe(self) -> dict:
        return {"pages_used": self.num_used, "pages_total": self.num_usable, "pages_cached": self.num_cached,
                "prefix_queried_tokens": self.prefix_queries, "prefix_hit_tokens": self.prefix_hits,
                "prefix_lower_hit_tokens": self.lower_hits}
