"""Two processes × 4 CPU devices, coordinated by jax.distributed over loopback (gloo collectives),
give the tokens of one process with 8 devices, and agree on what they decide alone (seeds, time); with
a mixture of experts split over them, each restores only its own experts."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import dataclasses

from meshserve.models.checkpoint import save_checkpoint
from tests.helpers import random_checkpoint
from tests.sharding.test_expert_parallel import MOE
from tests.sharding.test_sharded_engine import WIDE, engine_tokens
from meshserve.sharding.mesh import MeshConfig

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Experts big enough that what a process holds dwarfs the rest of the model and the allocator's noise,
# in many layers (a restore holds one layer's arrays twice for a moment: read, then placed):
# 16 layers × 8 experts × 3 × 256 × 512 f32 = 201 MiB of experts, 100 MiB in each process.
BIG_MOE = dataclasses.replace(MOE, name="big-moe", hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=8,
                              num_layers=16, num_experts=8, moe_intermediate_size=512, dense_layers=())


def run_two(tmp_path, config, axes: dict, warm: bool = False) -> tuple[list, list[dict]]:
    """Tokens of one process holding all 8 devices, and the two processes' reports; warm: the workers
    restore a small checkpoint before the one measured."""
    ckpt = random_checkpoint(config, tmp_path / "tok", seed=3)
    folder = save_checkpoint(tmp_path / "ckpt", ckpt.config, ckpt.params, ckpt.tokenizer)
    extra = []
    if warm:
        small = random_checkpoint(WIDE, tmp_path / "tok-warm", seed=4)
        extra = [str(save_checkpoint(tmp_path / "warm", small.config, small.params, small.tokenizer))]
    expected, _ = engine_tokens(ckpt, MeshConfig.from_dict({"axes": axes, "num_devices": 8}).build())
    del ckpt
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.multihost_worker", str(port), str(i),
                               json.dumps(axes), str(folder), *extra],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:  # bounded in time: never leave a process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["process"] for r in results) == [0, 1]
    return expected, results


@pytest.mark.parametrize("data,tensor", [(1, 8), (2, 4)], ids=["tensor=8", "data=2,tensor=4"])
def test_two_processes_equal_one(tmp_path, data, tensor):
    expected, results = run_two(tmp_path, WIDE, {"data": data, "tensor": tensor})
    for r in results:
        assert r["tokens"] == expected
    # one mesh, one set of decisions: the same seeds for unseeded requests, the same clock
    assert results[0]["sampled"] == results[1]["sampled"]
    assert results[0]["clock"] == results[1]["clock"] and results[0]["clock"] == sorted(results[0]["clock"])


def test_two_processes_split_the_experts_and_restore_only_their_own(tmp_path):
    """expert=8 over 2 processes × 4 devices: each process's devices hold half the experts, it reads
    from the checkpoint little more than half of what is stored (the expert arrays are stored one
    expert per chunk, and tensorstore reads only the chunks asked for), and its host memory while
    restoring stays under 1.5× the bytes its devices hold (reading every expert would be 2×). The read
    bytes are the exact measure; the RSS one carries the allocator's and thread pools' noise, which
    grows with the machine's core count (+23 MiB on a many-core runner)."""
    expected, results = run_two(tmp_path, BIG_MOE, {"data": 1, "tensor": 1, "expert": 8}, warm=True)
    stored = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    experts_total = BIG_MOE.num_layers * BIG_MOE.num_experts * 3 * BIG_MOE.hidden_size * BIG_MOE.moe_intermediate_size * 4
    for r in results:
        assert r["tokens"] == expected
        held = r["held_bytes"]
        assert held["experts"] == experts_total // 2
        print(f"process {r['process']}: read {r['read_bytes'] / 2**20:.1f} MiB, restore {r['restore_bytes'] / 2**20:.1f} MiB at its peak, "
              f"{r['kept_bytes'] / 2**20:.1f} MiB after, for "
              f"{held['experts'] / 2**20:.1f} MiB of experts ({held['all'] / 2**20:.1f} MiB in all, "
              f"{stored / 2**20:.1f} MiB stored)")
        assert r["read_bytes"] < 0.6 * stored
        assert r["restore_bytes"] < 1.5 * held["all"]
