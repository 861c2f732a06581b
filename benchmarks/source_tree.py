"""Imported first by every benchmark script: lets it run from a source checkout where meshserve is
not installed (the GPU machine, say). The repository root then stands as the `meshserve` package,
as the installed layout has it (models/ is meshserve.models, …).

MESHSERVE_TREE=<folder> makes that folder (another checkout: an older commit, say) the `meshserve`
package instead, whatever is installed: how a benchmark times two commits side by side."""

import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stand_in(root: Path) -> None:
    sys.modules.pop("meshserve", None)
    package = types.ModuleType("meshserve")
    package.__path__ = [str(root)]
    sys.modules["meshserve"] = package


if os.environ.get("MESHSERVE_TREE"):
    _stand_in(Path(os.environ["MESHSERVE_TREE"]).resolve())
else:
    try:
        import meshserve.runtime  # noqa: F401  (installed, or installed as editable)
    except ImportError:
        _stand_in(ROOT)
