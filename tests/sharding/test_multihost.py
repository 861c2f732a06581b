"""Two processes × 4 CPU devices, coordinated by jax.distributed over loopback (gloo collectives),
give the tokens of one process with 8 devices, and agree on what they decide alone (seeds, time)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshserve.models.checkpoint import save_checkpoint
from tests.helpers import random_checkpoint
from tests.sharding.test_sharded_engine import WIDE, engine_tokens, layout

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("data,tensor", [(1, 8), (2, 4)], ids=["tensor=8", "data=2,tensor=4"])
def test_two_processes_equal_one(tmp_path, data, tensor):
    ckpt = random_checkpoint(WIDE, tmp_path / "tok", seed=3)
    folder = save_checkpoint(tmp_path / "ckpt", ckpt.config, ckpt.params, ckpt.tokenizer)
    expected, _ = engine_tokens(ckpt, layout(data, tensor))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.multihost_worker", str(port), str(i),
                               str(data), str(tensor), str(folder)],
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
    for r in results:
        assert r["tokens"] == expected
    # one mesh, one set of decisions: the same seeds for unseeded requests, the same clock
    assert results[0]["sampled"] == results[1]["sampled"]
    assert results[0]["clock"] == results[1]["clock"] and results[0]["clock"] == sorted(results[0]["clock"])
