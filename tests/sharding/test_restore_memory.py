"""Sharded restore never holds the whole checkpoint in host memory at once.

On CPU devices the restored arrays themselves live in host memory, so the measure is the transient:
peak RSS − RSS before − bytes the 8 devices hold afterwards. Restoring the whole tree on the host
first (the naive way, measured alongside) costs about the checkpoint's size; ours must stay well
under half of it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure(folder: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.sharding.restore_memory", str(folder), mode],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_restore_transient_is_a_fraction_of_the_checkpoint(smollm_ckpt):
    ours = measure(smollm_ckpt.path, "sharded")
    naive = measure(smollm_ckpt.path, "whole")
    size = ours["checkpoint_bytes"]
    print(f"checkpoint {size / 2**20:.0f} MiB: transient {ours['transient_bytes'] / 2**20:.0f} MiB sharded, "
          f"{naive['transient_bytes'] / 2**20:.0f} MiB whole")
    # the measure does see a whole-tree restore (376–586 MiB of 513 seen here: peak RSS moves with
    # what the allocator hands back, so the bound is loose)
    assert naive["transient_bytes"] > 0.6 * size and naive["transient_bytes"] > 4 * ours["transient_bytes"]
    assert ours["transient_bytes"] < 0.5 * size
