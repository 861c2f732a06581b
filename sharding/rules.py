"""Logical axis names → mesh axes → PartitionSpecs.

Every parameter of models/llama.py names its axes ("vocab", "embed", "q_heads", …). A rule table maps
each logical name to a mesh axis (or None: replicated). A dimension whose size the mesh axis does not
divide is replicated rather than split unevenly.
"""

from __future__ import annotations

from typing import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, str | None]

# Tensor parallelism over heads, MLP and vocabulary; `data` holds independent replicas.
DEFAULT_RULES: Rules = {
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "batch": "data",
}


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
