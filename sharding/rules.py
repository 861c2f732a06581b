"""Logical axis names → mesh axes → PartitionSpecs.

Every array meshserve places on devices names its axes: parameters (models/decoder.py: "vocab",
"embed", "q_heads", …), the KV pool ("pages", "page_slots", "kv_heads", "head_dim") and the per-step
batch arrays ("batch", …). A rule table maps each logical name to a mesh axis, or to None
(replicated). A dimension the mesh axis does not divide is replicated rather than split unevenly —
unless the mesh file lists that logical axis under `require_split`, which turns it into an error.

    layout = Layout(mesh, rules)
    layout.spec(("embed", "q_heads", "head_dim"), (576, 9, 64))   → P(None, None, None) on tensor=2
    layout.sharding(axes, shape)                                   → NamedSharding
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshserve.models.config import ModelConfig
from meshserve.models.errors import ConfigError
from meshserve.models.moe import ExpertPlan

Rules = Mapping[str, str | None]

MESH_AXES = ("data", "tensor", "expert")  # "expert" is reserved for mixture-of-experts models

# Tensor parallelism over heads, MLP and vocabulary; `data` holds independent replicas of the batch
# slots and the page pool.
DEFAULT_RULES: Rules = {
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",  # a mixture of experts' experts (replicated on meshes without the axis)
    "router": None,  # the router's per-expert scores: every shard routes every token
    "layers": None,
    "batch": "data",
    "tokens": None,
    "fields": None,  # the packed columns of a call's inputs
    "rows": None,  # the requests of a ragged prefill call: never split (any replica's may share it)
    "pages": "data",
    "page_slots": None,
    "context": None,
    "top": None,
}
LOGICAL_AXES = tuple(DEFAULT_RULES)


def partition_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} axis names {axes} for an array of rank {len(shape)}")
    spec, used = [], set()
    for name, size in zip(axes, shape):
        if name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}")
        mesh_axis = rules[name]
        if (mesh_axis is None or mesh_axis not in mesh.shape or mesh_axis in used
                or size % mesh.shape[mesh_axis]):
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def sharding_fn(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """(axes, shape) → NamedSharding, the form models.checkpoint.load_checkpoint takes."""
    def fn(axes: tuple[str, ...], shape: tuple[int, ...]) -> jax.sharding.Sharding:
        return NamedSharding(mesh, partition_spec(axes, shape, mesh, rules))
    return fn


def check_rules(rules: Rules, mesh_axes: tuple[str, ...]) -> None:
    """ConfigError for a rule naming an unknown logical axis or an axis the mesh does not have."""
    for name, target in rules.items():
        if name not in LOGICAL_AXES:
            raise ConfigError(f"rules: unknown logical axis {name!r} (known: {', '.join(LOGICAL_AXES)})")
        # the default rules may name an axis a mesh leaves out ("expert"): it is then replicated
        if target is not None and target not in mesh_axes and DEFAULT_RULES.get(name) != target:
            raise ConfigError(f"rules: {name!r} maps to mesh axis {target!r}, which the mesh does not "
                              f"have (axes: {', '.join(mesh_axes)})")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rules that place arrays on it."""

    mesh: Mesh
    rules: Rules = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))
    require_split: tuple[str, ...] = ()

    def __post_init__(self):
        check_rules(self.rules, tuple(self.mesh.axis_names))
        for name in self.require_split:
            if name not in LOGICAL_AXES:
                raise ConfigError(f"require_split: unknown logical axis {name!r}")

    @classmethod
    def single(cls, device: jax.Device | None = None) -> "Layout":
        """Everything on one device (the default when no mesh file is given)."""
        device = device or jax.devices()[0]
        return cls(Mesh(np.array([device]).reshape(1, 1), ("data", "tensor")))

    def size(self, mesh_axis: str | None) -> int:
        return self.mesh.shape.get(mesh_axis, 1) if mesh_axis else 1

    def axis(self, logical: str) -> str | None:
        """The mesh axis a logical axis maps to (None: replicated)."""
        return self.rules.get(logical)

    @property
    def replicas(self) -> int:
        """Independent replicas of batch slots and page pool (the size of the `batch` mesh axis)."""
        return self.size(self.axis("batch"))

    def spec(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> PartitionSpec:
        return partition_spec(axes, shape, self.mesh, self.rules)

    def sharding(self, axes: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def check_model(self, config: ModelConfig) -> None:
        """ConfigError before any compile when the model cannot be laid out on this mesh."""
        sizes = {"q_heads": config.num_heads, "kv_heads": config.num_kv_heads, "vocab": config.vocab_size,
                 "mlp": config.intermediate_size, "embed": config.hidden_size}
        for name in self.require_split:
            n, target = sizes.get(name), self.axis(name)
            if n is None or target is None:
                continue
            if n % self.size(target):
                raise ConfigError(f"{name}: {n} cannot be split over mesh axis {target!r} of size "
                                  f"{self.size(target)} (the mesh requires it to be split: choose a size that divides it)")
        expert_axis = self.axis("expert")
        if expert_axis is not None and self.size(expert_axis) > 1:
            if not config.num_experts:
                raise ConfigError(f"the mesh splits experts over {expert_axis!r} (size {self.size(expert_axis)}) "
                                  f"but {config.name or 'the model'} has no experts")
            if config.num_experts % self.size(expert_axis):
                raise ConfigError(f"expert: {config.num_experts} experts cannot be split over mesh axis "
                                  f"{expert_axis!r} of size {self.size(expert_axis)} (choose a size that divides it)")
        if self.replicas > 1 and self.axis("pages") != self.axis("batch"):
            raise ConfigError("rules: 'pages' must map to the same mesh axis as 'batch' (each data "
                              "replica owns its batch slots and its share of the page pool)")

    def for_model(self, config: ModelConfig) -> "Layout":
        """These rules, with attention heads replicated where they cannot split consistently: q heads
        split only when the mesh axis divides them, kv heads only when it divides them too; when kv
        heads cannot split (fewer than the axis size) they are replicated — never dropped — and each
        shard's q heads must then share one kv head, else q heads are replicated as well."""
        self.check_model(config)
        H, K = config.num_heads, config.num_kv_heads
        q_axis, kv_axis = self.axis("q_heads"), self.axis("kv_heads")
        q_split = q_axis is not None and H % self.size(q_axis) == 0
        kv_split = q_split and kv_axis == q_axis and K % self.size(kv_axis) == 0
        if q_split and not kv_split:
            per_shard = H // self.size(q_axis)
            q_split = (H // K) % per_shard == 0
        if not q_split and "q_heads" in self.require_split and q_axis is not None:
            raise ConfigError(f"q_heads: {H} q heads over {K} kv heads cannot be split over mesh axis "
                              f"{q_axis!r} of size {self.size(q_axis)} (the mesh requires it)")
        rules = {**self.rules, "q_heads": q_axis if q_split else None, "kv_heads": kv_axis if kv_split else None}
        return dataclasses.replace(self, rules=rules)

    def experts(self, config: ModelConfig, platform: str) -> ExpertPlan:
        """How programs on this layout run an MoE model's experts: split over the `expert` rule's mesh
        axis (replicate the tokens, run the local experts, sum), with the platform's grouped matmul."""
        axis = self.axis("expert")
        shards = self.size(axis) if config.num_experts and axis is not None else 1
        return ExpertPlan(shards=shards, grouped="loop" if platform == "cpu" else "ragged_dot")

    def place(self, params, config: ModelConfig):
        """In-memory params (a test's, a converter's) onto this layout."""
        from meshserve.models.decoder import param_axes

        layout = self.for_model(config)

        def put(names, a):  # each process places the shards of its own devices (several hosts too)
            target = layout.sharding(names, a.shape)
            if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(target, a.ndim):
                return a  # already there (restored into this layout)
            host = np.asarray(a)
            return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

        return jax.tree.map(put, param_axes(config), params, is_leaf=lambda x: isinstance(x, tuple))

    def describe(self) -> str:
        return " × ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
