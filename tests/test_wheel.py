"""The built wheel works outside the checkout: installed into a fresh virtual environment, its
``speccascade bench`` runs from another directory with nothing of the source tree on the path.

The fresh environment reuses this environment's installed dependencies through a ``.pth`` line
(a plain path, so the checkout's editable install is not carried along) and gets the wheel with
``--no-deps``: nothing is downloaded and torch is not installed again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]


def run(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the package sources, so the build leaves nothing in the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "speccascade", source / "speccascade", ignore=shutil.ignore_patterns("__pycache__"))
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
                "-q", "-w", tmp_path / "dist", source)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("speccascade-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    """A virtual environment whose own site-packages is empty, with this environment's packages behind it."""
    made = run(sys.executable, "-m", "venv", "--without-pip", path)
    assert made.returncode == 0, made.stderr
    python = path / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_bench(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "speccascade/bench/command.py" in names
    assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)

    python = fresh_venv(tmp_path / "venv")
    installed = run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", "--no-compile", wheel)
    assert installed.returncode == 0, installed.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    origin = run(python, "-c", "import importlib.util; print(importlib.util.find_spec('speccascade').origin)", cwd=work)
    assert Path(origin.stdout.strip()).is_relative_to(tmp_path / "venv"), origin.stdout  # the wheel's copy, not the checkout

    script = tmp_path / "venv" / "bin" / "speccascade"
    bench = run(script, "bench", "--models", "tiny-random", "--out", "out", "--prompts", "1", "--batch-sizes", "1",
                "--max-new-tokens", "4", "--repeats", "1", cwd=work)
    assert bench.returncode == 0, bench.stderr
    report = json.loads((work / "out" / "bench.json").read_text())
    assert {r["name"] for r in report["results"]} >= {"assisted generation", "exact speculative decoding"}
    assert "| exact speculative decoding | speccascade | 1 |" in bench.stdout

    if not torch.cuda.is_available():  # bad input: one line, exit 2, nothing written
        refused = run(script, "bench", "--models", "tiny-random", "--out", "refused", "--device", "cuda", cwd=work)
        assert (refused.returncode, refused.stderr.strip().count("\n")) == (2, 0), refused.stderr
        assert refused.stderr.startswith("error: device 'cuda' asked for, but no CUDA GPU") and not (work / "refused").exists()
