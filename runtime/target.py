"""What a program is built for, named explicitly: the platform and the device kind.

Kernel choice and interpret mode follow the target a program is built for, never the backend the
building process happens to run on: so the same code builds the GPU programs on a CPU host
(compile-only devices: benchmarks/gpu_build.py) and runs them on the card.

    Target.of(device)  → Target("gpu", "NVIDIA H100 80GB HBM3")
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str  # "cpu" | "gpu" | "tpu"
    device_kind: str = ""
    compute_capability: str = ""  # a CUDA GPU's, "9.0" ("": not known, or not one)

    def __post_init__(self):
        if self.platform not in ("cpu", "gpu", "tpu"):
            raise ValueError(f"platform must be cpu, gpu or tpu, got {self.platform!r}")

    @staticmethod
    def of(device) -> "Target":
        """The target of a jax device: a real one, or a compile-only one of a topology."""
        platform = {"cuda": "gpu", "rocm": "gpu"}.get(device.platform, device.platform)
        return Target(platform, device.device_kind, str(getattr(device, "compute_capability", "") or ""))

    @property
    def interpret(self) -> bool:
        """The Pallas kernels are written for GPUs; elsewhere (CPU tests) they run interpreted."""
        return self.platform != "gpu"

    @property
    def attention(self) -> str:
        """The attention a program uses unless configured: the kernels where they compile."""
        return "pallas" if self.platform == "gpu" else "reference"


CPU = Target("cpu")
