"""Imported first by every benchmark script: lets it run from a source checkout where meshserve is
not installed (the GPU machine, say). The repository root then stands as the `meshserve` package,
as the installed layout has it (models/ is meshserve.models, …)."""

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

try:
    import meshserve.runtime  # noqa: F401  (installed, or installed as editable)
except ImportError:
    sys.modules.pop("meshserve", None)
    package = types.ModuleType("meshserve")
    package.__path__ = [str(ROOT)]
    sys.modules["meshserve"] = package
