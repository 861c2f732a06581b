"""Mesh files: which devices meshserve runs on and how arrays are split over them.

    # configs/meshes/h100x8.yaml
    platform: gpu
    axes: {data: 1, tensor: 8}          # one size may be -1: whatever the devices leave
    rules: {q_heads: tensor, ...}       # optional overrides of sharding.rules.DEFAULT_RULES
    require_split: [q_heads]            # logical axes that must split evenly (else an error)
    distributed:                        # only for several hosts; jax.distributed does the rest
      coordinator_address: 10.0.0.1:8476      # or "env:VAR" to read it from the environment
      num_processes: 2
      process_id: env:MESHSERVE_PROCESS_ID

    mesh = MeshConfig.from_yaml(path)   # validated; touches no device
    layout = mesh.setup()               # jax.distributed.initialize if asked, then a Layout

Everything is checked before a device is touched or a program compiled, and every problem is one
ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from meshserve.models.errors import ConfigError
from meshserve.sharding.rules import DEFAULT_RULES, MESH_AXES, Layout, check_rules

PLATFORMS = ("cpu", "gpu", "tpu")


def _resolve(field: str, value: Any) -> Any:
    """`env:NAME` → the environment variable NAME (an error when unset)."""
    if isinstance(value, str) and value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ConfigError(f"distributed.{field}: environment variable {name} is not set")
        return os.environ[name]
    return value


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Arguments of jax.distributed.initialize; each may be given as "env:VAR"."""

    coordinator_address: str | None
    num_processes: int | str
    process_id: int | str
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout_s: int = 300

    def resolved(self) -> tuple[str, int, int]:
        address = _resolve("coordinator_address", self.coordinator_address)
        if not address:
            raise ConfigError("distributed.coordinator_address is missing (host:port of process 0)")
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"distributed.coordinator_address must be host:port, got {address!r}")
        values = []
        for field in ("num_processes", "process_id"):
            raw = _resolve(field, getattr(self, field))
            try:
                values.append(int(raw))
            except (TypeError, ValueError):
                raise ConfigError(f"distributed.{field} must be an integer, got {raw!r}") from None
        count, pid = values
        if count < 1:
            raise ConfigError(f"distributed.num_processes must be >= 1, got {count}")
        if not 0 <= pid < count:
            raise ConfigError(f"distributed.process_id must be in [0, {count}), got {pid}")
        return str(address), count, pid


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    axes: tuple[tuple[str, int], ...]  # (mesh axis, size) in mesh order; one size may be -1
    platform: str | None = None  # the backend jax must report; None: whatever it has
    num_devices: int | None = None  # use N devices (all when None) …
    first_device: int = 0  # … from this one on: two meshes of one host's devices, e.g. prefill and decode
    cpu_devices: int | None = None  # simulated CPU devices to ask XLA for (tests, laptops)
    rules: tuple[tuple[str, str | None], ...] = ()
    require_split: tuple[str, ...] = ()
    distributed: Distributed | None = None
    name: str = ""

    def __post_init__(self):
        names = [a for a, _ in self.axes]
        if not names:
            raise ConfigError("axes: at least one mesh axis is needed")
        for a, n in self.axes:
            if a not in MESH_AXES:
                raise ConfigError(f"axes: unknown mesh axis {a!r} (known: {', '.join(MESH_AXES)})")
            if not isinstance(n, int) or (n < 1 and n != -1):
                raise ConfigError(f"axes: size of {a!r} must be a positive integer or -1, got {n!r}")
        if len(set(names)) != len(names):
            raise ConfigError("axes: a mesh axis is listed twice")
        for needed in ("data", "tensor"):
            if needed not in names:
                raise ConfigError(f"axes: the mesh needs a {needed!r} axis (size 1 if unused)")
        if sum(n == -1 for _, n in self.axes) > 1:
            raise ConfigError("axes: at most one axis may have size -1")
        if self.platform is not None and self.platform not in PLATFORMS:
            raise ConfigError(f"platform must be one of {', '.join(PLATFORMS)}, got {self.platform!r}")
        if not isinstance(self.first_device, int) or self.first_device < 0:
            raise ConfigError(f"first_device must be a non-negative integer, got {self.first_device!r}")
        for field in ("num_devices", "cpu_devices"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{field} must be a positive integer, got {v!r}")
        check_rules(dict(self.rules), tuple(names))
        for name in self.require_split:
            if name not in DEFAULT_RULES:
                raise ConfigError(f"require_split: unknown logical axis {name!r}")
        fixed = math.prod(n for _, n in self.axes if n != -1)
        if self.num_devices is not None and -1 not in dict(self.axes).values() and fixed != self.num_devices:
            raise ConfigError(f"axes: sizes multiply to {fixed} but num_devices is {self.num_devices}")

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "MeshConfig":
        import yaml

        try:
            data = yaml.safe_load(open(path))
        except OSError as e:
            raise ConfigError(f"cannot read mesh file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"mesh file {path} is not valid YAML: {e}") from None
        try:
            return cls.from_dict(data, name=os.path.splitext(os.path.basename(str(path)))[0])
        except ConfigError as e:
            raise ConfigError(f"mesh file {path}: {e}") from None

    @classmethod
    def from_dict(cls, data: Any, name: str = "") -> "MeshConfig":
        if not isinstance(data, Mapping):
            raise ConfigError("expected a mapping with an 'axes' section")
        known = {"axes", "platform", "num_devices", "first_device", "cpu_devices", "rules", "require_split",
                 "distributed"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) {', '.join(unknown)}")
        axes = data.get("axes")
        if not isinstance(axes, Mapping):
            raise ConfigError("axes: expected a mapping of mesh axis → size, e.g. {data: 1, tensor: 8}")
        rules = data.get("rules") or {}
        if not isinstance(rules, Mapping):
            raise ConfigError("rules: expected a mapping of logical axis → mesh axis or null")
        require = data.get("require_split") or []
        if not isinstance(require, list):
            raise ConfigError("require_split: expected a list of logical axes")
        dist = data.get("distributed")
        if dist is not None:
            if not isinstance(dist, Mapping):
                raise ConfigError("distributed: expected a mapping")
            fields = {f.name for f in dataclasses.fields(Distributed)}
            bad = sorted(set(dist) - fields)
            if bad:
                raise ConfigError(f"distributed: unknown field(s) {', '.join(bad)}")
            for req in ("num_processes", "process_id"):
                if req not in dist:
                    raise ConfigError(f"distributed.{req} is missing")
            ids = dist.get("local_device_ids")
            dist = Distributed(**{**dist, "local_device_ids": tuple(ids) if ids is not None else None,
                                  "coordinator_address": dist.get("coordinator_address")})
        return cls(axes=tuple((str(k), v) for k, v in axes.items()), platform=data.get("platform"),
                   num_devices=data.get("num_devices"), first_device=data.get("first_device", 0),
                   cpu_devices=data.get("cpu_devices"),
                   rules=tuple(rules.items()), require_split=tuple(require), distributed=dist, name=name)

    # ---- devices -------------------------------------------------------------------------------

    def initialize(self) -> None:
        """Process-wide set-up that must happen before jax touches a device: simulated CPU devices,
        and jax.distributed for several hosts. Idempotent."""
        import jax

        if self.distributed is not None:
            address, count, pid = self.distributed.resolved()
            if not jax.distributed.is_initialized():
                jax.distributed.initialize(address, count, pid,
                                           local_device_ids=self.distributed.local_device_ids,
                                           initialization_timeout=self.distributed.initialization_timeout_s)
        if self.cpu_devices is not None:
            try:
                jax.config.update("jax_num_cpu_devices", self.cpu_devices)
            except RuntimeError:
                pass  # backends already up: the device check in build() reports a mismatch

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in, checked against the device count."""
        fixed = math.prod(n for _, n in self.axes if n != -1)
        sizes = dict(self.axes)
        for a, n in self.axes:
            if n == -1:
                if num_devices % fixed:
                    raise ConfigError(f"axes: {num_devices} devices cannot be split with the fixed axis "
                                      f"sizes (product {fixed})")
                sizes[a] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            shape = ", ".join(f"{a}={n}" for a, n in sizes.items())
            raise ConfigError(f"axes: {shape} needs {math.prod(sizes.values())} devices but "
                              f"{num_devices} are in use")
        return sizes

    def build(self, devices: list | None = None) -> Layout:
        """The jax Mesh over this process group's devices (or over `devices`: a topology's
        compile-only ones, to build programs for a target this host does not have), and its rules."""
        import jax
        from jax.sharding import Mesh

        given = devices is not None
        devices = list(devices) if given else jax.devices()
        found = {"cuda": "gpu", "rocm": "gpu"}.get(devices[0].platform, devices[0].platform)
        if self.platform is not None and found != self.platform:
            raise ConfigError(f"platform: the mesh file asks for {self.platform} but the devices are {found}")
        first, count = self.first_device, self.num_devices if self.num_devices is not None else len(devices)
        if first + count > len(devices):
            raise ConfigError(f"devices {first}…{first + count - 1} asked (first_device {first}, num_devices "
                              f"{count}), {len(devices)} present")
        if self.num_devices is not None or first:
            devices = devices[first:first + count]
        sizes = self.sizes(len(devices))
        if self.num_devices is None and not first and not given and len(devices) == jax.device_count():
            from jax.experimental import mesh_utils  # topology-aware order (NVLink, hosts)

            grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices,
                                                 allow_split_physical_axes=True)
        else:
            import numpy as np

            grid = np.array(devices).reshape(tuple(sizes.values()))
        mesh = Mesh(grid, tuple(sizes))
        return Layout(mesh, {**DEFAULT_RULES, **dict(self.rules)}, self.require_split)

    def setup(self) -> Layout:
        self.initialize()
        return self.build()


def load_sharded(folder, layout: Layout, progress: bool = True):
    """Restore a checkpoint straight into `layout`: Orbax reads, on each process, only the shards of
    that process's devices, one layer group at a time (never the whole checkpoint in host memory)."""
    from meshserve.models.checkpoint import load_checkpoint, read_meta

    _, config, _ = read_meta(folder)
    return load_checkpoint(folder, sharding=layout.for_model(config).sharding, progress=progress)
