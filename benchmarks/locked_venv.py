"""A benchmark's own virtual environment, made from its lock (locks/*.txt) as the Makefile makes .venv:
pinned pip and setuptools first, the tool against the lock as constraints, then locks/venvlock.py's
check that the venv holds exactly the pins. Made again when the lock changes."""

from __future__ import annotations

import hashlib
import subprocess
import venv
from pathlib import Path

LOCKS = Path(__file__).resolve().parents[1] / "locks"


def ensure(folder: Path, lock: str, requirement: str, absent: tuple[str, ...] = ()) -> Path:
    """The venv's Python. `absent`: distributions the lock pulls in but the tool runs without
    (uninstalled after the install, and checked to stay out)."""
    lock_file = LOCKS / lock
    python = folder / "bin" / "python"
    stamp = folder / ".lock-sha256"
    digest = hashlib.sha256(lock_file.read_bytes() + repr(absent).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return python
    print(f"setting up {folder.name} ({requirement}, locks/{lock}) …", flush=True)
    venv.create(folder, with_pip=True, clear=True)
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(lock_file)]
    subprocess.run([*pip, "--upgrade", "pip", "setuptools"], check=True)
    subprocess.run([*pip, requirement], check=True)
    if absent:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *absent], check=True)
    check = [str(python), str(LOCKS / "venvlock.py"), "check", str(lock_file)]
    subprocess.run(check + (["--absent", *absent] if absent else []), check=True)
    stamp.write_text(digest)
    return python
