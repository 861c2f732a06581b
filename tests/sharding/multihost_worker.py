"""One process of the two-process test (tests/sharding/test_multihost.py): 4 CPU devices of an
8-device mesh coordinated by jax.distributed over loopback; restores the checkpoint's shards of its
own devices and prints, as JSON, the greedy tokens, tokens sampled without a seed, and clock readings."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"


def main(port: int, process_id: int, data: int, tensor: int, folder: str) -> None:
    from meshserve.sharding.mesh import MeshConfig

    mesh = MeshConfig.from_dict({"axes": {"data": data, "tensor": tensor}, "distributed": {
        "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": process_id,
        "initialization_timeout_s": 60}})
    layout = mesh.setup()

    import jax

    from meshserve.runtime.sampling import SamplingParams
    from meshserve.sharding.mesh import load_sharded
    from tests.sharding.test_sharded_engine import engine_tokens, prompts

    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    ckpt = load_sharded(folder, layout, progress=False)  # each process restores its own shards
    shards = ckpt.params["layers"][0]["mlp"]["gate_proj"].addressable_shards
    assert len(shards) == 4  # only this process's devices
    tokens, engine = engine_tokens(ckpt, layout)
    # no seed: each request's comes from the engine's base seed, which the processes agree on
    sampled = engine.generate(prompts(1), SamplingParams(max_tokens=8, temperature=1.0))
    clock = [engine.clock.now() for _ in range(3)]  # process 0's readings, in every process
    print(json.dumps({"process": jax.process_index(), "tokens": tokens,
                      "sampled": [list(c.token_ids) for c in sampled], "clock": clock}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
