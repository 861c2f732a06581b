"""No module of ours may take the name of a top-level module importable from the venv.

A script's own folder is first on `sys.path`, and the repository root is on it in tests (pytest's
`pythonpath`): a file there named like an installed module shadows that module for every library that
imports it. benchmarks/kernels.py did, once transformers 5.25 began to import the `kernels` package.
So every folder that holds a script, or is put on `sys.path`, is checked against what the venv can
import (the standard library and site-packages).
"""

import importlib.machinery
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The repository root (pytest's pythonpath), and the folders of scripts run as `python path/to/x.py`
# (or put on PYTHONPATH, as benchmarks/gpu_suite.sh does with benchmarks/).
SCRIPT_FOLDERS = ("benchmarks", "locks", "tests")


def folders(root: Path) -> list[Path]:
    """The root and every folder under the script folders, but hidden ones (a benchmark's .venv)."""
    found = [root]
    for top in SCRIPT_FOLDERS:
        for folder, subfolders, _ in os.walk(root / top):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__pycache__")
            found.append(Path(folder))
    return found


def our_modules(folder: Path):
    """(name, path, shadows_regular): a .py file or a package shadows any module of its name; a plain
    folder (no __init__.py) only merges into a namespace package of its name."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or (entry.name.startswith("__") and entry.stem.endswith("__")):
            continue
        if entry.suffix == ".py":
            yield entry.stem, entry, True
        elif entry.is_dir() and entry.name.isidentifier():
            yield entry.name, entry, (entry / "__init__.py").exists()


def outside_paths(*roots: Path) -> list[str]:
    """sys.path without the folders of these source trees (nor '', the working directory); the venv's
    folders stay, wherever the venv lies."""
    venv = Path(sys.prefix).resolve()
    kept = []
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        inside = any(path == root or root in path.parents for root in roots)
        if not inside or path == venv or venv in path.parents:
            kept.append(entry)
    return kept


def shadowed(root: Path) -> list[str]:
    paths = outside_paths(ROOT, root.resolve())
    stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    problems = []
    for folder in folders(root):
        for name, entry, regular in our_modules(folder):
            spec = importlib.machinery.PathFinder.find_spec(name, paths)
            namespace = spec is not None and spec.origin is None
            if regular and (name in stdlib or spec is not None):
                where = "the standard library" if name in stdlib else spec.origin or "a namespace package"
                problems.append(f"{entry.relative_to(root)} shadows `{name}` ({where})")
            elif not regular and namespace:
                problems.append(f"{entry.relative_to(root)} merges into the package `{name}`")
    return problems


def test_no_script_folder_shadows_an_importable_module():
    assert shadowed(ROOT) == []


# `kernels` is installed (transformers needs it), `json` is the standard library's, and `google` is a
# namespace package (protobuf's) that a plain folder would merge into.
@pytest.mark.parametrize("name", ["benchmarks/kernels.py", "tests/serving/json.py", "locks/google", "yaml"])
def test_a_module_named_like_an_importable_one_is_caught(tmp_path, name):
    for folder in SCRIPT_FOLDERS:
        (tmp_path / folder / "ok").mkdir(parents=True)
    target = tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.mkdir() if target.suffix == "" else target.write_text("")
    if name == "yaml":  # a package at the root, put on sys.path by pytest
        (target / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "fine_name.py").write_text("")
    (tmp_path / "tests" / "serving" / "kernels").mkdir(parents=True)  # a plain folder beside a regular package: no harm
    assert [line.split(" ")[0] for line in shadowed(tmp_path)] == [name]
