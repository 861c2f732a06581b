"""The serving config file: `server:` (this module) and `engine:` (runtime.engine.EngineConfig).

    server = ServerConfig.from_yaml("configs/serving/default.yaml")
    server = server.override(port=8000)            # command-line flags win over the file

Secrets may be written as "env:VAR" (auth tokens): the value is read from the environment, so the
file itself can be committed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from meshserve.models import generation
from meshserve.models.config import config_from_dict, read_yaml_section
from meshserve.models.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int | None = 50051  # gRPC; None: off (the OpenAI HTTP API alone); 0: any free port
    model: str | None = None  # checkpoint folder; None: the default model
    mesh: str | None = None  # mesh file; None: one device, or the two sizes below
    tensor_parallel_size: int | None = None  # without a mesh file: a data × tensor mesh of these sizes
    data_parallel_size: int | None = None
    enable_expert_parallel: bool = False  # with those sizes: a mixture's experts split over tensor's devices
    metrics_port: int | None = 9464  # Prometheus /metrics over HTTP; None: off; 0: any free port
    http_port: int | None = None  # the OpenAI-compatible HTTP API; None: off; 0: any free port
    served_model_name: str | None = None  # the model's name in the HTTP API; None: the checkpoint's
    max_message_bytes: int = 4 * 2**20  # larger requests are refused (RESOURCE_EXHAUSTED)
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    auth_tokens: tuple[str, ...] = ()  # bearer tokens ("authorization: Bearer T"); empty: no auth
    drain_timeout_s: float = 30.0  # on SIGTERM: how long in-flight requests may finish
    step_timeout_s: float | None = 300.0  # one engine step running longer means a hung device: fail, exit
    # the HTTP API against slow or idle clients: a connection must send a request's headers within
    # http_header_timeout_s of opening (or of its last response), and its body within
    # http_body_timeout_s of the headers; at most http_max_connections are open at once
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 30.0
    http_max_connections: int = 2048
    # sampling defaults of requests that leave a field unset: "auto", the model's (its
    # generation_config.json, models/generation.py); "none", the API's own (OpenAI's temperature 1 on
    # HTTP, greedy on gRPC); override_generation_config is laid over either (e.g. {"temperature": 0.7})
    generation_config: str = "auto"
    override_generation_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 65536:
                raise ConfigError(f"server.{name} must be in [0, 65536) or null, got {value}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"server.max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("server.tls_cert and server.tls_key go together: set both or neither")
        if self.step_timeout_s is not None and not self.step_timeout_s > 0:
            raise ConfigError(f"server.step_timeout_s must be positive or null, got {self.step_timeout_s}")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"server.drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        for name in ("http_header_timeout_s", "http_body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"server.{name} must be positive, got {getattr(self, name)}")
        if self.http_max_connections < 1:
            raise ConfigError(f"server.http_max_connections must be >= 1, got {self.http_max_connections}")
        for name in ("tensor_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"server.{name} must be a positive integer, got {value!r}")
        if self.mesh and (self.tensor_parallel_size or self.data_parallel_size or self.enable_expert_parallel):
            raise ConfigError("a mesh file and tensor/data/expert parallel settings go apart: the mesh file says "
                              "them all (rules: {expert: tensor} for experts over the tensor axis)")
        if self.generation_config not in ("auto", "none"):
            raise ConfigError(f"server.generation_config must be auto or none, got {self.generation_config!r}")
        if not isinstance(self.override_generation_config, Mapping):
            raise ConfigError("server.override_generation_config must be a mapping, e.g. {\"temperature\": 0.7}")
        generation.check(self.override_generation_config, "server.override_generation_config", ConfigError)
        for t in self.auth_tokens:
            if not isinstance(t, str) or not t:
                raise ConfigError("server.auth_tokens must be non-empty strings")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ServerConfig":
        """The `server:` section of a serving config file."""
        return cls.from_dict(read_yaml_section(path, "server"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ServerConfig":
        values = dict(data)
        if "auth_tokens" in values:
            tokens = values["auth_tokens"] or []
            if isinstance(tokens, str):
                tokens = [tokens]
            values["auth_tokens"] = tuple(t for raw in tokens for t in _secret(raw))
        for key in ("model", "mesh", "tls_cert", "tls_key"):
            if values.get(key):
                values[key] = os.path.expanduser(str(values[key]))
        return config_from_dict(cls, values, "server config")

    def mesh_config(self):
        """The mesh to run on (sharding.mesh.MeshConfig; validated, no device touched), or None for one
        device: the mesh file, else the data × tensor sizes given (a mixture's experts split over the
        tensor axis's devices with enable_expert_parallel, as vLLM's flag does, else their width)."""
        from meshserve.sharding.mesh import MeshConfig

        if self.mesh:
            return MeshConfig.from_yaml(self.mesh)
        tp, dp = self.tensor_parallel_size or 1, self.data_parallel_size or 1
        if tp * dp == 1:
            return None
        rules = (("expert", "tensor"),) if self.enable_expert_parallel else ()
        return MeshConfig(axes=(("data", dp), ("tensor", tp)), num_devices=tp * dp, require_split=("q_heads",),
                          rules=rules, name=f"data={dp} × tensor={tp}" + (", experts over tensor" if rules else ""))

    def sampling_defaults(self, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
        """What a request's unset sampling fields take: the model's (or none), overridden."""
        base = model_defaults if self.generation_config == "auto" else {}
        return {**base, **generation.check(self.override_generation_config, "override_generation_config",
                                           ConfigError)}

    def override(self, **flags) -> "ServerConfig":
        """Command-line flags (None = not given) over the file's values."""
        given = {k: v for k, v in flags.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self


def _secret(raw: Any) -> list[str]:
    """"env:VAR" → the tokens in $VAR (comma-separated); anything else as written."""
    raw = str(raw)
    if raw.startswith("env:"):
        name = raw[4:]
        if name not in os.environ:
            raise ConfigError(f"server.auth_tokens: environment variable {name} is not set")
        return [t.strip() for t in os.environ[name].split(",") if t.strip()]
    return [raw]
