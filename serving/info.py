"""What a transport may say about the engine, read once when it is ready: the serving layer never
reaches into the engine's parts (its scheduler, pool, KV manager) to describe it."""

from __future__ import annotations

import dataclasses
from typing import Any

from meshserve.models.config import ModelConfig
from meshserve.models.tokenizer import Tokenizer
from meshserve.runtime.request import RequestLimits


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    model: ModelConfig
    tokenizer: Tokenizer
    served_model_name: str | None  # server.served_model_name
    checkpoint_name: str | None  # the checkpoint folder's name (None: a model made in memory)
    dtype: str
    mesh: str  # "data=1 × tensor=8"
    device: Any  # the first device of the mesh (a KV transfer server binds to it)
    context_length: int  # the longest request (max_seq_len within the model's context)
    priority_levels: int
    limits: RequestLimits
    eos_ids: frozenset[int]
    page_size: int
    kv_pages: int  # usable pages of the pool
    kv_page_shape: tuple[int, ...]  # one page across every layer (how pages leave the pool)
    kv_page_dtype: Any  # of those pages (uint8 bytes for a quantized cache)
    kv_cache_dtype: Any  # what the pool holds: the model's dtype, or int8 / float8_e4m3fn codes
    kv_fingerprint: str
    kv_events: bool  # the engine logs cached-page events for a KV-aware router
    kv_store: str | None
    replicas: int  # data replicas (Dynamo's dp ranks)
    max_num_seqs: int
    max_num_batched_tokens: int
    sampling_defaults: dict  # what a request's unset sampling fields take (ServerConfig.sampling_defaults)
    grammars: Any = None  # the engine's GrammarCompiler (structured outputs), shared with the frontends
    speculative_tokens: int = 0  # the most drafts a step a request may ask for (0: no speculation)

    @classmethod
    def of(cls, engine, served_model_name: str | None = None, sampling_defaults: dict | None = None) -> "EngineInfo":
        path = engine.checkpoint.path
        return cls(engine.model_config, engine.tokenizer, served_model_name, path.name if path else None,
                   str(engine.checkpoint.dtype), engine.layout.describe(), engine.layout.mesh.devices.flat[0],
                   engine.max_seq_len, engine.config.priority_levels, engine.config.limits, engine.eos_ids,
                   engine.config.page_size, engine.kv.num_usable, engine.pool.page_shape, engine.pool.page_dtype,
                   engine.pool.dtype, engine.fingerprint.hex(), engine.kv_events is not None, engine.config.kv_store,
                   engine.replicas, engine.config.max_num_seqs, engine.config.max_num_batched_tokens,
                   dict(sampling_defaults or {}), engine.grammars, engine.speculative_tokens)

    @property
    def served_name(self) -> str:
        """The model's one name on every API: server.served_model_name, else the checkpoint folder's
        (as vLLM names a model by its path), else the config's."""
        return self.served_model_name or self.checkpoint_name or self.model.name

    @property
    def numerics(self) -> dict[str, Any]:
        """How the model computes, as the APIs describe it: the float dtype, the linear layers'
        quantization (None: float) and the KV cache's dtype."""
        import numpy as np

        return {"dtype": self.dtype, "quantization": self.model.quantization,
                "kv_cache_dtype": np.dtype(self.kv_cache_dtype).name}

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size
