"""Peak host memory of restoring a checkpoint onto 8 CPU devices (run by test_restore_memory.py in a
fresh process, so the peak is this restore's). Prints JSON: checkpoint bytes, bytes the devices hold
afterwards, and the transient peak (peak RSS − RSS before − device bytes).

    python -m tests.sharding.restore_memory CKPT_DIR sharded|whole
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process image's high-water RSS (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent across fork + exec, so a big parent (pytest) would inflate it."""
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def main(folder: str, mode: str) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint  # noqa: F401  (imported before the baseline)

    from meshserve.models.checkpoint import PARAMS_DIR, read_meta
    from meshserve.models.decoder import param_axes
    from meshserve.sharding.mesh import MeshConfig, load_sharded

    layout = MeshConfig.from_dict({"axes": {"data": 1, "tensor": 8}}).build()
    _, config, dtype = read_meta(folder)
    jax.device_put(np.zeros(8), layout.replicated()).block_until_ready()  # backends up before the baseline
    before = rss()
    if mode == "sharded":
        params = load_sharded(folder, layout, progress=False).params
    else:  # the naive way, for contrast: the whole tree on the host, then placed
        import orbax.checkpoint as ocp

        from meshserve.models.decoder import abstract_params

        target = abstract_params(config, dtype)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        with ocp.PyTreeCheckpointer() as ckptr:
            host = ckptr.restore(os.path.join(folder, PARAMS_DIR),
                                 args=ocp.args.PyTreeRestore(item=target, restore_args=args))
        params = layout.place(host, config)
        del host
    jax.block_until_ready(params)
    peak = peak_rss()
    held = sum(s.data.nbytes for a in jax.tree.leaves(params) for s in a.addressable_shards)
    total = sum(int(np.prod(a.shape)) * np.dtype(dtype).itemsize for a in jax.tree.leaves(params))
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(param_axes(config), is_leaf=lambda x: isinstance(x, tuple)))
    print(json.dumps({"checkpoint_bytes": total, "device_bytes": held, "transient_bytes": peak - before - held,
                      "before": before, "peak": peak, "after": rss()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
