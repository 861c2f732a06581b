"""Checkpoint folders: an Orbax params tree with the model config and tokenizer beside it.

    CKPT_DIR/
      meshserve.json          {"format": 1, "dtype": "float32", "source": "gguf"}
      config.yaml             models.config.ModelConfig
      tokenizer.json          \
      tokenizer_config.json   / models.tokenizer.Tokenizer
      generation_config.json  sampling defaults (models.generation), when the source had any
      params/                 Orbax PyTree checkpoint (OCDBT + tensorstore), one array per weight

A folder is written under a hidden temporary name and renamed into place only when complete, so a
failed or interrupted conversion never leaves a partial checkpoint at the requested path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Union

import jax
import numpy as np
from tqdm.auto import tqdm

from meshserve.models.config import ModelConfig
from meshserve.models.errors import CheckpointError, ConfigError, ConvertError
from meshserve.models.generation import load as load_generation, save as save_generation
from meshserve.models.decoder import Params, abstract_params, param_axes
from meshserve.models.tokenizer import Tokenizer

FORMAT = 1
META_FILE, CONFIG_FILE, PARAMS_DIR = "meshserve.json", "config.yaml", "params"

# Where each restored array goes: one Sharding for all, or a function of the array's logical axes
# names and shape (see sharding/rules.py); None means the default device.
ShardingSpec = Union[jax.sharding.Sharding, Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding], None]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    dtype: np.dtype
    params: Params
    generation: dict = dataclasses.field(default_factory=dict)  # sampling defaults (models/generation.py)


def check_new_folder(out: str | Path) -> Path:
    out = Path(out).expanduser().absolute()
    if out.exists():
        raise CheckpointError(f"output folder {out} already exists; remove it or choose another --out")
    return out


def save_checkpoint(out: str | Path, config: ModelConfig, params: Params, tokenizer: Tokenizer,
                    source: str = "", generation: dict | None = None) -> Path:
    import orbax.checkpoint as ocp

    out = check_new_folder(out)
    # the float arrays share one dtype; a quantized weight's parts (q, scale, zero) have their own
    dtypes = {np.dtype(a.dtype).name for path, a in jax.tree_util.tree_leaves_with_path(params)
              if getattr(path[-1], "key", None) not in ("q", "scale", "zero")}
    if len(dtypes) != 1:
        raise CheckpointError(f"params must share one dtype, got {sorted(dtypes)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "dtype": dtypes.pop(), "source": source}))
        config.to_yaml(tmp / CONFIG_FILE)
        tokenizer.save(tmp)
        save_generation(tmp, generation or {})
        with ocp.PyTreeCheckpointer() as saver:
            saver.save(tmp / PARAMS_DIR, params, save_args=_save_args(config, params))
        os.rename(tmp, out)  # atomic: the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_args(config: ModelConfig, params: Params):
    """Expert arrays are stored one expert per chunk (several small ones together, up to 1 MiB: smaller
    chunks cost more than they save), so a process restoring its shard of the experts reads only those
    (tensorstore reads whole chunks); everything else as Orbax chooses."""
    import orbax.checkpoint as ocp

    def args(names, a):
        if "expert" not in names:
            return ocp.SaveArgs()
        axis = names.index("expert")
        return ocp.SaveArgs(chunk_byte_size=max(a.nbytes // a.shape[axis], 2**20), shard_axes=(axis,))

    return jax.tree.map(args, _subtree(param_axes(config), params), params,
                        is_leaf=lambda x: isinstance(x, tuple))


def read_meta(folder: str | Path) -> tuple[Path, ModelConfig, np.dtype]:
    folder = Path(folder).expanduser().absolute()
    if not (folder / META_FILE).is_file():
        raise CheckpointError(f"{folder} is not a meshserve checkpoint (no {META_FILE})")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: unsupported checkpoint format {meta.get('format')!r}")
    try:
        config = ModelConfig.from_yaml(folder / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return folder, config, np.dtype(jax.numpy.dtype(meta["dtype"]))


def load_checkpoint(folder: str | Path, sharding: ShardingSpec = None, progress: bool = True) -> Checkpoint:
    """Restore a checkpoint; each array is read by tensorstore straight into its target sharding
    (no full host copy first), one layer at a time so a progress bar can follow."""
    import orbax.checkpoint as ocp

    folder, config, dtype = read_meta(folder)
    tokenizer = Tokenizer.load(folder)
    try:
        generation = load_generation(folder)
    except ConvertError as e:
        raise CheckpointError(str(e)) from None
    target = abstract_params(config, dtype)
    axes = param_axes(config)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def restore_args(spec, names):
        s = sharding(names, spec.shape) if callable(sharding) else sharding
        return ocp.ArrayRestoreArgs(sharding=s, global_shape=spec.shape, dtype=spec.dtype)

    _check_stored_shapes(folder, target)
    groups = [{k: v for k, v in target.items() if k != "layers"}]
    groups += [{"layers": {i: layer}} for i, layer in target["layers"].items()]
    params: Params = {"layers": {}}
    with ocp.PyTreeCheckpointer() as restorer:
        # disable=None: the bar shows on a terminal only, not in logs
        for group in tqdm(groups, desc="loading", unit="group", disable=None if progress else True):
            group_axes = _subtree(axes, group)
            # axes tuples sit where `group` has leaves
            args = jax.tree.map(restore_args, group, group_axes)
            try:
                part = restorer.restore(folder / PARAMS_DIR, args=ocp.args.PyTreeRestore(
                    item=group, restore_args=args, partial_restore=True))
            except (FileNotFoundError, ValueError, KeyError) as e:
                raise CheckpointError(f"cannot restore {folder / PARAMS_DIR}: {e}") from None
            layers = part.pop("layers", {})
            params["layers"].update(layers)
            params.update(part)
    return Checkpoint(folder, config, tokenizer, dtype, params, generation)


def _check_stored_shapes(folder: Path, target: Params) -> None:
    """CheckpointError naming the first array whose stored shape is not the config's (an expert count,
    a width), or that the checkpoint lacks, before anything is read."""
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as reader:
            stored = reader.metadata(folder / PARAMS_DIR)
        stored = getattr(stored, "item_metadata", stored)
        stored = getattr(stored, "tree", stored)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read {folder / PARAMS_DIR}: {e}") from None
    flat = {tuple(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for path, spec in jax.tree_util.tree_flatten_with_path(target)[0]:
        key = tuple(str(getattr(k, "key", k)) for k in path)
        name = "/".join(key)
        if key not in flat:
            raise CheckpointError(f"{folder}: the checkpoint has no array {name} (its config.yaml expects one)")
        shape = tuple(getattr(flat[key], "shape", ()) or ())
        if shape != tuple(spec.shape):
            raise CheckpointError(f"{folder}: array {name} has shape {shape}, its config.yaml expects "
                                  f"{tuple(spec.shape)}")


def _subtree(tree: dict, like: dict) -> dict:
    """The part of `tree` with the same keys as `like` (both nested dicts)."""
    return {k: _subtree(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}
