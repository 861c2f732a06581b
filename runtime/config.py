"""The engine's configuration (the `engine:` section of a serving config file), checked in one place
before anything is built."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from meshserve.models.config import KV_CACHE_DTYPES, config_from_dict, read_yaml_section
from meshserve.models.errors import ConfigError
from meshserve.runtime.kv_cache import ATTENTION
from meshserve.runtime.programs import Buckets
from meshserve.runtime.request import RequestLimits
from meshserve.runtime.scheduler import SchedulerConfig
from meshserve.runtime.speculative import SpeculativeConfig


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    kv_cache_bytes: int | None = None  # the KV pool; None: what the device's memory leaves (kv_manager.kv_budget)
    # the share of each GPU's memory the engine may take (weights, KV pool, activations), as vLLM's flag
    gpu_memory_utilization: float = 0.9
    max_seq_len: int = 2048  # capped at the model's context
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 256
    max_queue_size: int = 256
    queue_timeout_s: float | None = None
    priority_levels: int = 3
    prefill_tokens_while_decoding: int | None = None  # see SchedulerConfig; None: no limit
    max_bypass: int = 16  # see SchedulerConfig; 0: strict queue order
    prefill_buckets: tuple[int, ...] | None = None  # tokens per prefill call; None: 64, 128, … ×2 up to max_prefill_chunk
    decode_buckets: tuple[int, ...] | None = None  # None: 1, 4, 16, … up to max_num_seqs
    context_buckets: tuple[int, ...] | None = None  # in pages; None: one, of max_seq_len (attention reads real pages only)
    compilation_cache_dir: str | None = None
    compile_threads: int | None = None
    attention: str | None = None  # reference | pallas; None: pallas on GPU, reference elsewhere
    # what the KV pool holds: auto (the model's dtype), float32, bfloat16, or int8 / fp8 (e4m3) codes
    # with a dynamic scale per token and kv head (runtime/kv_quant.py)
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True  # reuse the KV pages of prompt prefixes seen before
    host_kv_bytes: int = 0  # host memory for prefix pages evicted from the device (0: none)
    kv_store: str | None = None  # tensorstore tier for pages leaving host memory: a folder or kvstore URL
    kv_store_write_through: bool = False  # also write every offloaded page to the store at once
    kv_store_bytes: int = 64 << 30  # the store's capacity; past it, its least recently used pages are deleted
    limits: RequestLimits = RequestLimits()  # what one request may carry (stop strings, stop ids)
    # build and dispatch step N+1 before reading step N back (its tokens feed N+1 on the device);
    # `step` then returns step N's outputs. False: each step is read back before the next is built.
    async_scheduling: bool = True
    # compile the programs that export and import a prompt's KV pages (disaggregated prefill and
    # decode: runtime/kv_transfer.py)
    kv_transfer: bool = False
    # speculative decoding (runtime/speculative.py): drafts proposed on the host, verified in one step
    speculative: SpeculativeConfig | None = None

    def __post_init__(self):
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a power of two, got {self.page_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ConfigError(f"kv_cache_bytes must be positive or null, got {self.kv_cache_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_seq_len < self.page_size:
            raise ConfigError(f"max_seq_len must be >= page_size, got {self.max_seq_len}")
        if self.attention not in (None, *ATTENTION):
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.host_kv_bytes < 0:
            raise ConfigError(f"host_kv_bytes must be >= 0, got {self.host_kv_bytes}")
        if self.kv_store_bytes <= 0:
            raise ConfigError(f"kv_store_bytes must be positive, got {self.kv_store_bytes}")
        if (self.host_kv_bytes or self.kv_store) and not self.enable_prefix_caching:
            raise ConfigError("host_kv_bytes and kv_store need enable_prefix_caching")
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ConfigError("max_prefill_chunk must be <= max_num_batched_tokens")
        self._check_buckets()
        try:
            self.scheduler_config()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check_buckets(self) -> None:
        """Buckets given by hand must cover the limits: a chunk or a context with no program to run
        it would fail at step time, for every request in the step."""
        for name in ("prefill_buckets", "decode_buckets", "context_buckets"):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
                raise ConfigError(f"{name} must be positive integers, got {list(sizes)}")
            if list(sizes) != sorted(set(sizes)):
                raise ConfigError(f"{name} must be in increasing order, got {list(sizes)}")
        if self.prefill_buckets and self.prefill_buckets[-1] < self.max_prefill_chunk:
            raise ConfigError(f"prefill_buckets: the largest ({self.prefill_buckets[-1]}) must be >= "
                              f"max_prefill_chunk ({self.max_prefill_chunk})")
        if self.context_buckets and self.context_buckets[-1] * self.page_size < self.max_seq_len:
            raise ConfigError(f"context_buckets: the largest ({self.context_buckets[-1]} pages of "
                              f"{self.page_size}) must hold max_seq_len ({self.max_seq_len} tokens)")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "EngineConfig":
        """The `engine:` section of a serving config file."""
        return cls.from_dict(read_yaml_section(path, "engine"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EngineConfig":
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "limits" in values:
            values["limits"] = config_from_dict(RequestLimits, values["limits"], "engine config limits")
        if values.get("speculative") is not None:
            values["speculative"] = config_from_dict(SpeculativeConfig, values["speculative"],
                                                     "engine config speculative")
        return config_from_dict(cls, values, "engine config")

    def buckets(self, max_pages: int, replicas: int) -> Buckets:
        """The shapes an engine compiles programs for: the configured buckets, else Buckets.default."""
        default = Buckets.default(self.max_prefill_chunk, self.max_num_seqs, max_pages, replicas,
                                  self.prefill_tokens_while_decoding)
        decode_batch = self.decode_buckets or default.decode_batch
        verify_batch, verify_tokens = (), 0
        spec = self.speculative
        if spec is not None:  # the decode buckets up to the cut-off, and the one that holds it
            cut = min(spec.disable_by_batch_size, self.max_num_seqs)
            verify_batch = tuple(b for b in decode_batch if b < cut) + (Buckets.pick(decode_batch, cut),)
            verify_tokens = spec.num_speculative_tokens + 1
        return Buckets(prefill_tokens=self.prefill_buckets or default.prefill_tokens, decode_batch=decode_batch,
                       context_pages=self.context_buckets or default.context_pages, max_rows=self.max_num_seqs,
                       verify_batch=verify_batch, verify_tokens=verify_tokens)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_prefill_chunk,
                               self.max_queue_size, self.queue_timeout_s, self.priority_levels,
                               prefill_tokens_while_decoding=self.prefill_tokens_while_decoding,
                               max_bypass=self.max_bypass)
