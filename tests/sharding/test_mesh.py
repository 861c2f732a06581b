"""Mesh files: the shipped ones load, bad ones fail with one clear error before any compile."""

import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from meshserve.models.config import ModelConfig
from meshserve.models.errors import ConfigError
from meshserve.sharding.mesh import MeshConfig

ROOT = Path(__file__).resolve().parents[2]
MESHES = ROOT / "configs" / "meshes"
SMOLLM = ModelConfig.named("smollm2-135m")


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    return path


def test_shipped_mesh_files_load():
    names = sorted(p.stem for p in MESHES.glob("*.yaml"))
    assert names == ["cpu-1", "cpu-8", "cpu-8-decode", "cpu-8-experts", "cpu-8-prefill", "h100x1", "h100x8",
                     "h100x8-2hosts", "qwen3-235b-a22b-h100x8", "qwen3-235b-a22b-h100x8-2hosts",
                     "qwen3-30b-a3b-h100x1"]
    loaded = {n: MeshConfig.from_yaml(MESHES / f"{n}.yaml") for n in names}
    assert dict(loaded["h100x8-2hosts"].axes) == {"data": 2, "tensor": 8}
    assert loaded["h100x8-2hosts"].distributed.num_processes == 2
    assert loaded["h100x8"].require_split == ("q_heads",)
    for n in ("qwen3-235b-a22b-h100x8", "qwen3-235b-a22b-h100x8-2hosts"):  # experts over 2 × width over 4
        assert {a: s for a, s in loaded[n].axes if a != "data"} == {"expert": 2, "tensor": 4}
        assert loaded[n].require_split == ("q_heads", "kv_heads")
    experts = loaded["cpu-8-experts"].build().for_model(ModelConfig.named("qwen3-30b-a3b"))
    assert experts.experts(ModelConfig.named("qwen3-30b-a3b"), "cpu").shards == 4
    assert experts.spec(("expert", "embed", "mlp"), (128, 2048, 768)) == P("expert", None, "tensor")
    for n in ("cpu-1", "cpu-8"):  # these build here
        layout = loaded[n].build()
        assert layout.mesh.size == (1 if n == "cpu-1" else 8)
    halves = [loaded[f"cpu-8-{role}"].build().mesh for role in ("prefill", "decode")]  # one device set, split
    assert [sorted(d.id for d in m.devices.flat) for m in halves] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dict(halves[1].shape) == {"data": 2, "tensor": 2}


def test_fill_axis_and_rules(tmp_path):
    mesh = MeshConfig.from_yaml(write(tmp_path, "axes: {data: 2, tensor: -1}\nrules: {vocab: null}\n"))
    layout = mesh.build()
    assert dict(layout.mesh.shape) == {"data": 2, "tensor": 4}
    assert layout.spec(("embed", "vocab"), (64, 296)) == P(None, None)  # the rule override
    assert layout.spec(("embed", "mlp"), (64, 128)) == P(None, "tensor")
    assert layout.spec(("pages", "page_slots", "kv_heads", "head_dim"), (8, 16, 8, 64)) == P("data", None, "tensor", None)


def test_kv_heads_fewer_than_tensor_are_replicated_not_dropped():
    config = ModelConfig.named("llama3-8b")  # 32 q / 8 kv heads
    layout = MeshConfig.from_dict({"axes": {"data": 1, "tensor": 8}}).build()
    assert layout.for_model(config).rules["kv_heads"] == "tensor"
    import dataclasses

    narrow = dataclasses.replace(config, num_kv_heads=2)  # 4 q heads per shard share one kv head
    rules = layout.for_model(narrow).rules
    assert rules["q_heads"] == "tensor" and rules["kv_heads"] is None
    rules = layout.for_model(SMOLLM).rules  # 9 heads: not split at all
    assert rules["q_heads"] is None and rules["kv_heads"] is None


BAD = {
    "sizes that do not match the devices": ("axes: {data: 1, tensor: 3}\n", "tensor=3 needs 3 devices but 8"),
    "an unknown mesh axis in a rule": ("axes: {data: 1, tensor: 8}\nrules: {mlp: pipeline}\n",
                                       "'mlp' maps to mesh axis 'pipeline'"),
    "an unknown logical axis in a rule": ("axes: {data: 1, tensor: 8}\nrules: {colour: tensor}\n",
                                          "unknown logical axis 'colour'"),
    "an unknown mesh axis": ("axes: {data: 1, tensor: 4, pipe: 2}\n", "unknown mesh axis 'pipe'"),
    "no tensor axis": ("axes: {data: 8}\n", "needs a 'tensor' axis"),
    "two fill axes": ("axes: {data: -1, tensor: -1}\n", "at most one axis may have size -1"),
    "a missing coordinator": ("axes: {data: 1, tensor: 8}\ndistributed: {num_processes: 2, process_id: 0}\n",
                              "coordinator_address is missing"),
    "an unset coordinator variable": ("axes: {data: 1, tensor: 8}\ndistributed: {coordinator_address: "
                                      "env:MESHSERVE_NO_SUCH_VAR, num_processes: 2, process_id: 0}\n",
                                      "MESHSERVE_NO_SUCH_VAR is not set"),
    "a process id out of range": ("axes: {data: 1, tensor: 8}\ndistributed: {coordinator_address: "
                                  "'127.0.0.1:1', num_processes: 2, process_id: 2}\n", "process_id must be in"),
    "a head count that cannot be split where required": (
        "axes: {data: 1, tensor: 2}\nnum_devices: 2\nrequire_split: [q_heads]\n",
        "q_heads: 9 cannot be split over mesh axis 'tensor' of size 2"),
    "a wrong platform": ("platform: gpu\naxes: {data: 1, tensor: 8}\n", "asks for gpu but the devices are cpu"),
    "not a mapping": ("- data\n", "expected a mapping"),
    "devices past the last": ("axes: {data: 1, tensor: 4}\nnum_devices: 4\nfirst_device: 6\n",
                              "devices 6…9 asked"),
    "a negative first device": ("axes: {data: 1, tensor: 1}\nfirst_device: -1\n",
                                "first_device must be a non-negative integer"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_mesh_file_fails_before_any_compile(tmp_path, name):
    text, message = BAD[name]
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if "compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            MeshConfig.from_yaml(write(tmp_path, text)).setup().for_model(SMOLLM)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_cli_bad_mesh_is_one_line(tmp_path, smollm_ckpt):
    mesh = write(tmp_path, "axes: {data: 1, tensor: 2}\nnum_devices: 2\nrequire_split: [q_heads]\n")
    proc = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "generate", "--model", str(smollm_ckpt.path),
                           "--mesh", str(mesh), "--quiet", "hello"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshserve: error: ") and "q_heads: 9" in lines[0], proc.stderr


def test_cli_generate_on_a_mesh(smollm_ckpt):
    """The default model, tensor-parallel over 8 simulated devices, answers like one device does."""
    proc = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "generate", "--model", str(smollm_ckpt.path),
                           "--mesh", str(MESHES / "cpu-8.yaml"), "--chat", "--quiet", "--max-tokens", "12",
                           "What is the capital of France?"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
