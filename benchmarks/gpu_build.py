"""Every GPU program built for H100 and H200 targets on a host without a GPU, so that a kernel or
program that does not compile for the card fails here (in `make test`), not on the device.

Runs with the GPU machine's jax and its CUDA plugin (.venv-gpu, from locks/gpu-build.txt), whose
compile-only devices stand for the card: a topology described by the card's GpuTargetConfigProto
(below), arrays as ShapeDtypeStructs on it, and `jit(...).trace(...).lower().compile()`, which runs
Triton's compile to PTX, ptxas and XLA's own checks (shared memory per block included).

    .venv-gpu/bin/python benchmarks/gpu_build.py [--targets h100,h200] [--only kernels,engine]
                                                  [--json FILE] [--broken]

For each target it builds
  kernels  the attention kernels at every shape and setting of tests/runtime/kernels/ and of the
           suite's benchmarks/attention_kernels.py;
  engine   the engine's prefill, decode and verify programs with Pallas attention (a GPU's default): the
           default model with configs/serving/default.yaml and the GPU suite's 8B-shaped engine on
           one device (configs/meshes/h100x1.yaml); the Llama-3-8B and 70B shapes in bf16
           tensor-parallel over an 8-device topology (configs/meshes/h100x8.yaml; 70B does not fit
           one card; their largest prefill and decode, both cards); every program of the one-card
           sets for the H100, the largest prefill and decode of each for the H200 (FULL_ENGINE_TARGET);
           and the 8B shape under the shipped config alone, its KV pool sized
           from the card's memory as the engine sizes it (largest prefill and decode, both cards); and
           the Qwen3 mixtures of experts in their shipped mesh files (largest two, the H100 only).
One line per program as it is built; a table last; exit 1 naming every program that failed and the
compiler's message. --broken adds a kernel known not to lower (a 3-element array), to show a
failure is caught and named.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend; the targets are compile-only
# Without a card XLA has nothing to autotune against: it would only spend time (a third of an 8B
# program's build). What is built is what XLA picks untuned; the card tunes its own at start-up.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_autotune_level=0".strip()

import source_tree  # noqa: E402,F401  (meshserve from this checkout when not installed)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Card:
    """What XLA needs to know of a card to compile for it (the gpu_device_info of a
    GpuTargetConfigProto); the H100 SXM's and H200's figures, as XLA's own target specs list them."""

    name: str  # the device kind jax reports
    memory_bytes: int
    bandwidth: int  # bytes/s
    mem_clock_khz: int
    cudnn: tuple[int, int, int] = (9, 19, 0)  # the cuDNN jax-cuda13-plugin 0.11.2 is built against

    def target_config(self) -> str:
        major, minor, patch = self.cudnn
        return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 9.0a"
  model_str: "sm_9.0a with {self.memory_bytes}B RAM, 132 cores, 1980000KHz clock, {self.mem_clock_khz}KHz mem clock, 52428800B L2$"
  name: "{self.name}"
  driver_version: "13.0.0"
  runtime_version: "13.0.0"
  compile_time_toolkit_version: "13.0.0"
  dnn_version: "{major}.{minor}.{patch}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: {major} minor: {minor} patch: {patch} }}
device_description_str: "{self.name}"
"""


# H100 and H200 are one chip (compute capability 9.0, 132 SMs, the same shared memory and registers);
# they differ in memory size and bandwidth, which only XLA's scheduling and memory limits read. Every
# kernel is built for both; the engine's program sets in full for the H100, and their largest prefill
# and largest decode program for the H200 (the whole set twice would take make test past 40 minutes).
FULL_ENGINE_TARGET = "h100"

CARDS = {
    "h100": Card("NVIDIA H100 80GB HBM3", 84942979072, 3352320000000, 2619000),
    "h200": Card("NVIDIA H200", 151397597184, 4800000000000, 3750000),
}


class Target:
    """A card's compile-only devices, and the abstract mesh Pallas' Triton lowering reads the GPU's
    kind from."""

    def __init__(self, key: str, count: int = 1):
        self.card = CARDS[key]
        self.key = key
        topology = "1x1x1" if count == 1 else f"1x1x{count}"
        self.devices = topologies.get_topology_desc(platform="cuda", topology=topology,
                                                    target_config=self.card.target_config()).devices

    def abstract_mesh(self, shape=(1,), names=("x",)):
        device = AbstractDevice(device_kind=self.card.name, num_cores=132, platform="gpu")
        return AbstractMesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), abstract_device=device)


@dataclasses.dataclass
class Built:
    target: str
    part: str
    name: str
    seconds: float
    error: str | None = None


class Builder:
    """Lowers programs one after another (Python) and compiles them on a thread per core (XLA's
    compiles release the GIL), keeping each one's time or the compiler's message."""

    def __init__(self, threads: int, match: str | None):
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.match = match
        self.pending: list[concurrent.futures.Future] = []
        self.results: list[Built] = []
        self.lock = threading.Lock()

    def add(self, target: Target, part: str, name: str, lower, mesh=None, options=None) -> None:
        """lower() → a Lowered, run under the target's abstract mesh (Pallas reads the GPU's kind), then
        compiled with the XLA `options` the engine gives it."""
        if self.match and self.match not in name:
            return
        t = time.perf_counter()
        entry = Built(target.key, part, name, 0.0)
        try:
            with jax.sharding.use_abstract_mesh(mesh or target.abstract_mesh()):
                lowered = lower()
        except Exception as e:  # a failure is the finding: name the program, keep the compiler's words
            self._done(entry, time.perf_counter() - t, e)
            return
        self.pending.append(self.pool.submit(self._compile, entry, lowered, time.perf_counter() - t, options))

    def _compile(self, entry: Built, lowered, seconds: float, options=None) -> None:
        t = time.perf_counter()
        try:
            lowered.compile(options)
        except Exception as e:
            self._done(entry, seconds + time.perf_counter() - t, e)
        else:
            self._done(entry, seconds + time.perf_counter() - t, None)

    def finish(self) -> list[Built]:
        concurrent.futures.wait(self.pending)
        self.pending = []
        return self.results

    def _done(self, entry: Built, seconds: float, error: Exception | None) -> None:
        with self.lock:
            self._record(entry, seconds, error)

    def _record(self, entry: Built, seconds: float, error: Exception | None) -> None:
        entry.seconds = seconds
        if error is None:
            print(f"  ok   {entry.target} {entry.part}: {entry.name} ({seconds:.1f} s)", flush=True)
        else:
            entry.error = f"{type(error).__name__}: {error}".strip()
            print(f"  FAIL {entry.target} {entry.part}: {entry.name}\n{_indent(entry.error)}", flush=True)
            if os.environ.get("GPU_BUILD_TRACEBACK"):
                traceback.print_exception(error)
        self.results.append(entry)


def _indent(text: str, limit: int = 1500) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return "\n".join("       " + line for line in text.splitlines())


# ---- kernels ---------------------------------------------------------------------------------------

def kernel_cases():
    """(name, fn, args, kwargs) of every kernel call the kernel tests and the suite's kernel benchmark
    make, with the arrays as (shape, dtype)."""
    sys.path.insert(0, str(ROOT / "tests" / "runtime" / "kernels"))
    import attention_kernels as bench
    import test_attention_kernels as tests

    yield from tests.kernel_calls()
    for name, fn, args, kwargs in bench.kernel_calls():
        yield f"suite {name}", fn, args, kwargs


def broken_case():
    """A kernel Triton cannot lower (an array of 3 elements): the check must fail, naming it."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    fn = jax.jit(lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((3,), jnp.float32),
                                          compiler_params=plgpu.CompilerParams())(x))
    return "broken: a (3,) array", fn, (((3,), jnp.float32),), {}


def build_kernels(builder: Builder, target: Target, broken: bool) -> None:
    sharding = NamedSharding(Mesh([target.devices[0]], ("x",)), PartitionSpec())
    cases = list(kernel_cases()) + ([broken_case()] if broken else [])
    for name, fn, args, kwargs in cases:
        abstract = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in args]
        builder.add(target, "kernels", name, lambda: fn.trace(*abstract, **kwargs).lower())


# ---- engine programs --------------------------------------------------------------------------------

def engine_setups():
    """(name, model config, dtype, EngineConfig, mesh file, largest only, H100 only) of the engine
    program sets to build."""
    import engine_gpu

    from meshserve.models.config import ModelConfig
    from meshserve.runtime.engine import EngineConfig

    models = ROOT / "configs" / "models"
    meshes = ROOT / "configs" / "meshes"
    default = ModelConfig.from_yaml(models / "smollm2-135m.yaml")
    llama8 = ModelConfig.from_yaml(models / "llama3-8b.yaml")
    llama70 = ModelConfig.from_yaml(models / "llama3-70b.yaml")
    served = EngineConfig.from_yaml(ROOT / "configs" / "serving" / "default.yaml")
    suite = engine_gpu.engine_config(engine_gpu.parse_args(["engine"]))
    tp = dataclasses.replace(suite, kv_cache_bytes=suite.kv_cache_bytes * 8)  # the pool splits over 8 cards
    yield "default model, shipped config", default, "float32", served, meshes / "h100x1.yaml", False, False
    yield "GPU suite: Llama-3-8B shape", llama8, "bfloat16", suite, meshes / "h100x1.yaml", False, False
    # tensor-parallel over eight cards (the sets no device here runs): their largest prefill and decode
    yield "Llama-3-8B shape, tensor 8", llama8, "bfloat16", tp, meshes / "h100x8.yaml", True, False
    yield "Llama-3-70B shape, tensor 8", llama70, "bfloat16", tp, meshes / "h100x8.yaml", True, False
    # `meshserve serve llama-3-8b/` with no YAML of the user's: the shipped config, the pool sized from
    # the card's memory as the engine sizes it (its largest prefill and decode program)
    yield "Llama-3-8B shape, shipped config", llama8, "bfloat16", served, meshes / "h100x1.yaml", True, False
    # an 8-bit KV cache (the kernels read fp8 codes and their scales), the pool sized from the card's
    # memory: the default model's largest programs, the H100 only
    fp8_kv = dataclasses.replace(served, kv_cache_dtype="fp8")
    yield "default model, fp8 KV cache", default, "float32", fp8_kv, meshes / "h100x1.yaml", True, True
    # speculative decoding's verify programs (n-gram drafts, 5 a step: 6 query tokens a row through the
    # paged attention kernel), the default model, the H100 only
    from meshserve.runtime.speculative import SpeculativeConfig

    spec = dataclasses.replace(served, speculative=SpeculativeConfig(num_speculative_tokens=5))
    yield "default model, n-gram speculation", default, "float32", spec, meshes / "h100x1.yaml", True, True
    # mixtures of experts in their shipped mesh files, grouped matmuls by XLA's ragged_dot (largest prefill
    # and decode, the H100 only: 37-100 s a program to build): Qwen3-30B-A3B on one card, Qwen3-235B-A22B
    # with its experts split over eight
    qwen30 = ModelConfig.from_yaml(models / "qwen3-30b-a3b.yaml")
    qwen235 = ModelConfig.from_yaml(models / "qwen3-235b-a22b.yaml")
    yield ("Qwen3-30B-A3B, shipped config", qwen30, "bfloat16", served, meshes / "qwen3-30b-a3b-h100x1.yaml",
           True, True)
    yield ("Qwen3-235B-A22B, experts 8", qwen235, "bfloat16", served, meshes / "qwen3-235b-a22b-h100x8.yaml",
           True, True)


def device_memory(model, dtype, config, card, layout):
    """What one card gives the engine once its shard of the weights is in: its memory at
    gpu_memory_utilization (the share jax's allocator is set to take)."""
    from meshserve.models.decoder import abstract_params, param_axes
    from meshserve.runtime.kv_manager import Memory

    def shard_bytes(names, a):
        split = math.prod(layout.size(axis) for axis in layout.spec(names, a.shape) if axis is not None)
        return math.prod(a.shape) * jnp.dtype(dtype).itemsize // split

    weights = sum(jax.tree.leaves(jax.tree.map(shard_bytes, param_axes(model), abstract_params(model, dtype),
                                               is_leaf=lambda x: isinstance(x, tuple))))
    return Memory(int(card.memory_bytes * config.gpu_memory_utilization), in_use=weights)


def build_engine(builder: Builder, target: Target) -> None:
    from meshserve.models.decoder import abstract_params
    from meshserve.runtime.engine import kv_pool_bytes
    from meshserve.runtime.kv_cache import abstract_pool, page_bytes
    from meshserve.runtime.kv_manager import kv_pages
    from meshserve.runtime.kv_quant import cache_dtype
    from meshserve.runtime.programs import compiler_options, lower_programs
    from meshserve.runtime.target import Target as Platform
    from meshserve.sharding.mesh import MeshConfig

    topologies_by_count = {1: target}
    for name, model, dtype, config, mesh_file, largest_only, h100_only in engine_setups():
        if h100_only and target.key != FULL_ENGINE_TARGET:
            continue
        mesh_config = MeshConfig.from_yaml(mesh_file)
        count = math.prod(dict(mesh_config.axes).values())
        if count not in topologies_by_count:
            topologies_by_count[count] = Target(target.key, count)
        devices = topologies_by_count[count].devices
        layout = mesh_config.build(devices).for_model(model)
        config = dataclasses.replace(config, attention="pallas")
        max_seq_len = min(config.max_seq_len, model.max_position_embeddings)
        max_pages = -(-max_seq_len // config.page_size)
        kv_dtype = cache_dtype(config.kv_cache_dtype, dtype)
        per_page = page_bytes(model, config.page_size, kv_dtype)
        pages = kv_pages(per_page, config.page_size, max_seq_len, layout.replicas,
                         kv_pool_bytes(config, model, per_page, max_seq_len, layout,
                                       device_memory(model, dtype, config, target.card, layout)))
        buckets = config.buckets(max_pages, layout.replicas)
        params = abstract_params(model, jnp.dtype(dtype))
        pool = abstract_pool(model, pages, config.page_size, kv_dtype)
        mesh = target.abstract_mesh(tuple(layout.mesh.shape.values()), tuple(layout.mesh.axis_names))
        shapes = list(buckets.shapes(config.page_size))
        if target.key != FULL_ENGINE_TARGET or largest_only:  # the same chip: its largest prefill and decode
            families = ("verify",) if config.speculative is not None else ("prefill", "decode")
            shapes = [max((s for s in shapes if s[0] == family), key=lambda s: s[1] * s[2]) for family in families]
        for shape in shapes:
            family, rows, tokens, ctx = shape
            one = dataclasses.replace(buckets, prefill_tokens=(tokens,) if family == "prefill" else (),
                                      decode_batch=(rows,) if family == "decode" else (), context_pages=(ctx,),
                                      verify_batch=(rows,) if family == "verify" else ())
            label = f"{name} ({layout.describe()}, {pages} KV pages): {family} rows={rows} tokens={tokens} pages={ctx}"
            builder.add(target, "engine", label, lambda one=one: lower_programs(
                model, params, pool, one, config.attention, layout)[shape], mesh=mesh,
                options=compiler_options(Platform("gpu"), model))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="h100,h200")
    ap.add_argument("--only", default="kernels,engine")
    ap.add_argument("--match", default=None, help="only the programs whose names contain this")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="programs compiled at once")
    ap.add_argument("--json", type=Path, default=None, help="write every result here")
    ap.add_argument("--broken", action="store_true", help="add a kernel known not to lower")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    builder = Builder(args.threads, args.match)
    t0 = time.perf_counter()
    print(f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}; targets {args.targets}; "
          f"{args.threads} compile threads", flush=True)
    for key in args.targets.split(","):
        target = Target(key)
        print(f"{key}: {target.card.name}", flush=True)
        if "kernels" in parts:
            build_kernels(builder, target, args.broken)
        if "engine" in parts:
            build_engine(builder, target)
    results = builder.finish()
    failed = [r for r in results if r.error]
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    print(f"\n{'target':7}{'part':9}{'built':>7}{'failed':>8}{'compile s':>11}")
    for key in args.targets.split(","):
        for part in ("kernels", "engine"):
            mine = [r for r in results if r.target == key and r.part == part]
            if mine:
                print(f"{key:7}{part:9}{sum(not r.error for r in mine):7d}{sum(bool(r.error) for r in mine):8d}"
                      f"{sum(r.seconds for r in mine):11.1f}")
    print(f"{len(results) - len(failed)} of {len(results)} programs built in {time.perf_counter() - t0:.0f} s")
    if failed:
        print(f"{len(failed)} failed:")
        for r in failed:
            print(f"  {r.target} {r.part}: {r.name}: {r.error.splitlines()[0][:300]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
