"""``train-deferral`` end to end on tiny-random traces, W&B offline, DDP, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from speccascade.cli import main
from speccascade.data import traces
from speccascade.tracing.log_traces import log_traces
from speccascade.deferral import features as F
from speccascade.errors import SpeccascadeError
from speccascade.training import train_deferral
from speccascade.training.train import TrainSettings, resolve
from tests.training.test_train import planted_traces


@pytest.fixture(scope="module")
def tiny_traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    log_traces(root / "reference", models="tiny-random", task="arithmetic", limit=24, mode="reference", topk=0)
    log_traces(root / "on-policy", models="tiny-random", task="arithmetic", limit=8, mode="on-policy",
               max_new_tokens=8, topk=0)
    return root


def test_train_deferral_end_to_end_without_wandb(tiny_traces, tmp_path, capsys):
    out = tmp_path / "head"
    code = main(["train-deferral", "--traces", str(tiny_traces / "reference"), "--out", str(out), "--head", "token-mlp",
                 "--epochs", "2", "--wandb-mode", "disabled"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["features"][-1] == "p_rank" and config["provenance"]["traces"][0]["fingerprint"]
    assert (out / "model.safetensors").exists() and not (out / "wandb").exists()
    assert (out / "logs" / "version_0" / "metrics.csv").exists()  # local training curves
    metrics, points = config["metrics"], config["operating_points"]
    validation, thresholds, where = capsys.readouterr().out.splitlines()[-3:]
    assert validation == (f"train-deferral: validation on {metrics['val_rows']} rows ({metrics['train_rows']} trained on): "
                          f"AUROC {metrics['auroc']:.3f}")
    assert len(points) == 10 and all(f"{rate}: {threshold:.4g}" in thresholds for rate, threshold in points.items())
    assert where == (f"train-deferral: wrote {out} (config.json, model.safetensors, metrics.json, comparison.md, "
                     f"comparison.png); decode with learned:{out}")


def test_a_classification_head_says_its_calibration(tiny_traces, tmp_path, capsys):
    train_deferral([str(tiny_traces / "reference")], tmp_path / "head", objective="classification", epochs=1,
                   wandb_mode="disabled")
    metrics = json.loads((tmp_path / "head" / "metrics.json").read_text())
    validation, _, where = capsys.readouterr().out.splitlines()[-3:]
    assert validation.endswith(f"AUROC {metrics['auroc']:.3f}, ECE {metrics['ece']:.3f}, Brier {metrics['brier']:.3f}")
    assert "reliability.png)" in where  # the calibration plot, which a gap head has not


def test_train_deferral_offline_wandb_run_holds_the_logged_files(tiny_traces, tmp_path):
    out = tmp_path / "head"
    train_deferral([str(tiny_traces / "reference")], out, head="mlp", objective="classification", epochs=2, wandb_mode="offline")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files)  # the run's log, for `wandb sync`
    assert "reliability.png" in {p.name for p in out.iterdir()}


def test_two_process_ddp_training(tiny_traces, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "speccascade.cli", "train-deferral", "--traces", str(tiny_traces / "reference"),
                           "--out", str(tmp_path / "ddp"), "--epochs", "2", "--devices", "2", "--strategy", "ddp",
                           "--wandb-mode", "disabled"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["train_rows"] > 0


def test_bad_input(tiny_traces, tmp_path, capsys):
    empty = tmp_path / "empty"
    traces.write_manifest(empty, {"config": {}}, complete=True)
    with pytest.raises(SpeccascadeError, match="have no rows"):
        train_deferral([str(empty)], tmp_path / "o1", wandb_mode="disabled")
    settings = TrainSettings(traces=[str(tiny_traces / "on-policy")], out=tmp_path / "o2", objective="gap", wandb_mode="disabled")
    with pytest.raises(SpeccascadeError, match=r"lack columns \['gap'\] needed by objective 'gap'"):
        resolve(settings)  # refused from the shards' schema, before the output directory is taken or a row loaded
    assert not (tmp_path / "o2").exists()

    corrupt = tmp_path / "corrupt"
    planted_traces(corrupt, examples=20, rows=5)
    shard = next((corrupt / "shards").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-40] + b"\0" * 40)
    with pytest.raises(SpeccascadeError, match=f"{shard} is damaged"):  # its footer is read before any row
        train_deferral([str(corrupt)], tmp_path / "o3", wandb_mode="disabled")

    nan = tmp_path / "nan"
    planted_traces(nan, examples=40, rows=5)
    table = traces.load_traces(nan).to_pandas()
    table.loc[:6, "tv"] = np.nan
    table.loc[7, "gap"] = np.inf
    for path in (nan / "shards").glob("*"):
        path.unlink()
    traces.ShardWriter(nan, 0).write({c: table[c].to_numpy() for c in table.columns}, sorted(set(table["example_id"])))
    traces.write_manifest(nan, {"config": {}, "feature_spec": F.spec()}, complete=True)
    train_deferral([str(nan)], tmp_path / "o4", epochs=1, wandb_mode="disabled")
    assert "dropped 8 rows with NaN or infinite values" in capsys.readouterr().out

    assert main(["train-deferral", "--traces", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o5")]) == 2
    assert "holds no traces" in capsys.readouterr().err
