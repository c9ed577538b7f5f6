"""Quiet by default: a tiny train-deferral prints its own progress and paths, no third-party noise;
``-v`` shows the libraries' own output again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.training.test_train import planted_traces

NOISE = ("Tip:", "litlogger", "wandb:", "GPU available", "TPU available", "Warning", "warn(", "deprecated",
         "Generating train split", "Map:", "Trainer.fit", "logging interval", "Traceback")


def _train(traces: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "speccascade.cli", "train-deferral", "--traces", str(traces), "--out",
                           str(out), "--epochs", "2", "--wandb-mode", "offline", *extra], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[1])


def test_train_deferral_prints_no_third_party_noise_unless_verbose(tmp_path):
    traces = planted_traces(tmp_path / "traces", examples=40, rows=5)
    quiet = _train(traces, tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert not [n for n in NOISE if n in quiet.stdout], quiet.stdout
    assert f"train-deferral: wrote {tmp_path / 'quiet'}" in quiet.stdout and "W&B run: " in quiet.stdout
    verbose = _train(traces, tmp_path / "verbose", "-v")
    assert verbose.returncode == 0, verbose.stderr
    assert "GPU available" in verbose.stdout + verbose.stderr and "wandb:" in verbose.stdout + verbose.stderr
