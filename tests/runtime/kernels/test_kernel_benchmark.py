"""The GPU kernel benchmark runs end to end on CPU at tiny shapes (Pallas interpreted), so the script
handed to the GPU machine is known to work, and every variant is correct there."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_smoke_run_is_correct():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/kernels.py"), "--smoke"], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = lines[next(i for i, line in enumerate(lines) if line.startswith("variant")) + 1:]
    assert len(rows) == 10  # all but cuDNN, which needs a GPU
    for row in rows:
        err = float(row.split()[-1])
        assert err < 5e-3, row  # bf16 against the f32 reference
