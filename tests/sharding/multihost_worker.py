"""One process of the two-process tests (tests/sharding/test_multihost.py): 4 CPU devices of an
8-device mesh coordinated by jax.distributed over loopback; restores the checkpoint's shards of its
own devices and prints, as JSON, the greedy tokens, tokens sampled without a seed, clock readings, and
what the restore cost in host memory (its peak over the RSS before it) beside the bytes of the experts
and of all arrays its devices hold.

    python -m tests.sharding.multihost_worker PORT PROCESS_ID '{"data": 1, "tensor": 8}' CKPT_DIR [WARM_DIR]

WARM_DIR: a small checkpoint restored first, so the restore measured does not also pay the one-time
cost of tensorstore's thread pools and caches (about 35 MiB here).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM:")).split()[1]) * 1024


def read_bytes() -> int:
    """Bytes this process has read from files and sockets so far (rchar)."""
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("rchar:")).split()[1])


def main(port: int, process_id: int, axes: dict, folder: str, warm: str | None = None) -> None:
    from meshserve.sharding.mesh import MeshConfig

    mesh = MeshConfig.from_dict({"axes": axes, "distributed": {
        "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": process_id,
        "initialization_timeout_s": 60}})
    layout = mesh.setup()

    import jax

    from meshserve.runtime.sampling import SamplingParams
    from meshserve.sharding.mesh import load_sharded
    from meshserve.models.decoder import param_axes
    from tests.sharding.test_sharded_engine import engine_tokens, prompts

    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    if warm:
        from meshserve.sharding.rules import Layout

        warm_layout = Layout(layout.mesh, {**layout.rules, "expert": None})  # a dense model: no experts to split
        jax.block_until_ready(load_sharded(warm, warm_layout, progress=False).params)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS (VmHWM) starts again from the RSS now
    before, read_before = rss(), read_bytes()
    ckpt = load_sharded(folder, layout, progress=False)  # each process restores its own shards
    jax.block_until_ready(ckpt.params)
    peak, after, read = peak_rss(), rss(), read_bytes() - read_before
    shards = ckpt.params["layers"][0]["attn"]["q_proj"].addressable_shards
    assert len(shards) == 4  # only this process's devices
    held = {"experts": 0, "all": 0}
    for names, a in zip(jax.tree.leaves(param_axes(ckpt.config), is_leaf=lambda x: isinstance(x, tuple)),
                        jax.tree.leaves(ckpt.params)):
        nbytes = sum(s.data.nbytes for s in a.addressable_shards)
        held["all"] += nbytes
        held["experts"] += nbytes if "expert" in names else 0
    tokens, engine = engine_tokens(ckpt, layout)
    # no seed: each request's comes from the engine's base seed, which the processes agree on
    sampled = engine.generate(prompts(1), SamplingParams(max_tokens=8, temperature=1.0))
    clock = [engine.clock.now() for _ in range(3)]  # process 0's readings, in every process
    print(json.dumps({"process": jax.process_index(), "tokens": tokens,
                      "sampled": [list(c.token_ids) for c in sampled], "clock": clock,
                      "restore_bytes": peak - before, "kept_bytes": after - before, "read_bytes": read,
                      "held_bytes": held}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), *sys.argv[4:])
