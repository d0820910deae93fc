"""The built wheel, installed on its own, works from any directory.

A wheel is built from a copy of the working tree (a fresh copy, so no stale ``build/`` output can slip
in), installed into a new virtual environment (``--system-site-packages`` for numpy/numba/gguf,
``--no-deps`` so nothing is fetched), and then exercised from a directory outside the repository with
``PYTHONPATH`` cleared: the repository is not importable there, so everything that runs comes from
the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from hf_fixtures import make_qwen2_checkpoint

REPO = Path(__file__).resolve().parent.parent
# Folders whose Python files must all be in the wheel, and where they go.
SHIPPED = {"qwenlite": "qwenlite", "converters": "qwenlite/converters"}
COPY_IGNORE = shutil.ignore_patterns(".git", ".peer", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".ruff_cache", "*.gguf", "*.nbi", "*.nbc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "qwenlite"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, cwd=out)
    (whl,) = out.glob("qwenlite-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(venv, a working directory outside the repository, the environment to run in)."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    py = env_dir / "bin" / "python"
    # The venv's python runs the system pip (visible through the system site-packages), so the wheel
    # and its script land in the venv; --ignore-installed because the editable checkout is visible
    # there too, under the same name and version.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
                   check=True, cwd=env_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["QWENLITE_HOME"] = str(tmp_path_factory.mktemp("home"))
    work = tmp_path_factory.mktemp("elsewhere")
    where = subprocess.run(
        [str(py), "-c", "import qwenlite, qwenlite.converters, qwenlite.models_data as d; "
                        "print(qwenlite.__file__); print(qwenlite.converters.__file__); print(d.__file__)"],
        cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    for f in where:
        assert Path(f).resolve().is_relative_to(env_dir.resolve()), f"{f} is not from the installed wheel"
    return env_dir, work, env


def run(installed: tuple[Path, Path, dict[str, str]], *args: str) -> str:
    """Run the venv's ``python`` or ``qwenlite`` (``args[0]``) from outside the repository."""
    env_dir, work, env = installed
    r = subprocess.run([str(env_dir / "bin" / args[0]), *args[1:]], cwd=work, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_wheel_holds_only_qwenlite(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"qwenlite"}, sorted(top)
    assert len(dist_info) == 1
    assert "qwenlite/models_data/manifest.json" in names
    assert "qwenlite/py.typed" in names
    assert "qwenlite/server/page.html" in names  # the chat page of `qwenlite serve`
    for folder, target in SHIPPED.items():
        for f in (REPO / folder).rglob("*.py"):
            rel = f.relative_to(REPO / folder).as_posix()
            assert f"{target}/{rel}" in names, f"{folder}/{rel} is not in the wheel (a folder without __init__.py?)"


def test_installed_cli_and_converter(installed: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    listing = run(installed, "qwenlite", "pull", "--list")
    for m in manifest["models"]:
        assert m["name"] in listing
    run(installed, "python", "-c", "import qwenlite.converters.hf_to_gguf")
    assert "usage" in run(installed, "python", "-m", "qwenlite.converters.synthetic", "--help")

    hf_dir = make_qwen2_checkpoint(tmp_path, num_hidden_layers=1, hidden_size=64, intermediate_size=64,
                                   num_attention_heads=2, num_key_value_heads=1)
    gguf = tmp_path / "tiny.gguf"
    run(installed, "qwenlite", "convert", str(hf_dir), "-o", str(gguf), "--type", "f32")
    assert gguf.stat().st_size > 0
    run(installed, "qwenlite", "run", "-m", str(gguf), "-p", "hi", "-n", "2", "--temp", "0", "-t", "1")
