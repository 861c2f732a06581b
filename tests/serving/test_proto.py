"""The generated gRPC code in serving/proto is what grpcio-tools makes of the .proto today."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "serving/proto/meshserve/v1/generation.proto"
GENERATED = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Imeshserve=.", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"meshserve/{PROTO}"], cwd=ROOT,
                   check=True)
    for name in GENERATED:
        fresh = (tmp_path / "meshserve/serving/proto/meshserve/v1" / name).read_text()
        committed = (ROOT / "serving/proto/meshserve/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: regenerate it (command at the top of {PROTO})"
