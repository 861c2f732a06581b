"""meshserve installs under one name: `meshserve.models`, `meshserve.runtime`, … — never top-level
`models` or `serving`, which would collide with other projects' packages."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("models", "runtime", "sharding", "serving")


def test_every_package_folder_is_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {"meshserve." + str(init.parent.relative_to(ROOT)).replace("/", ".")
             for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}
    assert found <= listed, f"missing from pyproject.toml: {sorted(found - listed)}"


def test_no_module_imports_a_top_level_name():
    bad = []
    for folder in (*FOLDERS, "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                words = line.split()
                if len(words) > 1 and words[0] in ("from", "import") and words[1].split(".")[0] in FOLDERS:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_installs_beside_another_projects_models_package(tmp_path):
    target, foreign = tmp_path / "site", tmp_path / "other"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    (foreign / "models").mkdir(parents=True)
    (foreign / "models" / "__init__.py").write_text("FOREIGN = True\n")
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{foreign}"}
    check = ("import models, meshserve.runtime.engine, meshserve.serving.server, meshserve.serving.cli as cli; "
             "assert models.FOREIGN; print(meshserve.runtime.engine.__file__); "
             "print(cli.DEFAULT_SERVING_CONFIG.is_file())")
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    engine_file, config_found = out.stdout.split()
    assert Path(engine_file).is_relative_to(target) and config_found == "True"
