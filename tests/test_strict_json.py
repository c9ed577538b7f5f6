"""Every JSON file the commands write is strict JSON (no NaN or infinities), even when a metric is undefined."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from speccascade.cli import main
from speccascade.data import traces
from speccascade.deferral import features as F
from speccascade.report import write_json


def strict(text: str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity (Python's parser accepts them by default)."""

    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def json_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.json") if "wandb" not in p.parts)


def assert_strict(directory: Path) -> list[Path]:
    files = json_files(directory)
    assert files, f"no JSON written under {directory}"
    for path in files:
        strict(path.read_text())  # raises on NaN / Infinity, naming the constant
    return files


def one_class_traces(directory: Path, examples: int = 60, rows: int = 10, seed: int = 0) -> Path:
    """Traces where deferring always pays (every gap positive): AUROC has one class and is undefined."""
    rng = np.random.default_rng(seed)
    n = examples * rows
    cols = {name: rng.random(n).astype(np.float32) for name in F.POSITION_FEATURES}
    cols |= {"loss_p": np.full(n, 0.3, np.float32), "gap": (0.1 + 0.3 * cols["kl_qp"]).astype(np.float32)}
    cols["loss_q"] = (cols["loss_p"] + cols["gap"]).astype(np.float32)
    ids = [f"ex-{seed}-{i:04d}" for i in range(examples)]
    traces.ShardWriter(directory, rank=0).write({"example_id": np.repeat(ids, rows).astype(object)} | cols, ids)
    traces.write_manifest(directory, {"config": {}, "feature_spec": F.spec()}, complete=True)
    return directory


def test_write_json_turns_nan_and_infinities_into_null_and_keeps_finite_bytes(tmp_path):
    value = {"b": [1.5, float("nan")], "a": {"low": float("-inf"), "high": float("inf")}, "n": 3}
    text = write_json(tmp_path / "x.json", value).read_text()
    assert strict(text) == {"b": [1.5, None], "a": {"low": None, "high": None}, "n": 3}
    finite = {"b": [1.5, (2, 3)], "a": "x"}
    for indent, sort_keys in ((2, False), (1, False), (None, False), (2, True)):
        write_json(tmp_path / "y.json", finite, indent=indent, sort_keys=sort_keys)
        assert (tmp_path / "y.json").read_text() == json.dumps(finite, indent=indent, sort_keys=sort_keys)


def test_train_deferral_and_compare_write_strict_json_when_auroc_is_undefined(tmp_path):
    train, held_out = one_class_traces(tmp_path / "train"), one_class_traces(tmp_path / "test", seed=1)
    head = tmp_path / "head"
    assert main(["train-deferral", "--traces", str(train), "--out", str(head), "--epochs", "2", "--batch-size", "256",
                 "--wandb-mode", "disabled"]) == 0
    assert {"config.json", "metrics.json", "comparison.json"} <= {p.name for p in assert_strict(head)}
    metrics = strict((head / "metrics.json").read_text())
    assert metrics["auroc"] is None  # one class in the validation labels: undefined, written as null
    assert main(["compare", "--traces", str(held_out), "--heads", str(head), "--out", str(tmp_path / "cmp"),
                 "--resamples", "20", "--wandb-mode", "disabled"]) == 0
    assert "compare.json" in {p.name for p in assert_strict(tmp_path / "cmp")}
    assert_strict(train)  # the manifest and the shards' sidecars


def test_log_traces_and_evaluate_write_strict_json(tmp_path):
    assert main(["log-traces", "--models", "tiny-random", "--task", "arithmetic", "--limit", "3", "--mode", "reference",
                 "--topk", "0", "--out", str(tmp_path / "traces"), "--wandb-mode", "disabled"]) == 0
    assert "manifest.json" in {p.name for p in assert_strict(tmp_path / "traces")}
    assert main(["evaluate", "--models", "tiny-random", "--rules", "never", "--limit", "2", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "eval"), "--wandb-mode", "disabled"]) == 0
    results = strict((tmp_path / "eval" / "results.json").read_text())
    assert all(p["quality"] is None or math.isfinite(p["quality"]) for p in results["points"])
    assert len(assert_strict(tmp_path / "eval")) >= 1 + len(results["points"])  # results.json and each point's sidecar


def test_bench_writes_strict_json(tmp_path):
    assert main(["bench", "--models", "tiny-random", "--batch-sizes", "1", "--prompts", "2", "--max-new-tokens", "2",
                 "--repeats", "1", "--rules", "gain:0.2", "--no-transformers", "--out", str(tmp_path / "b")]) == 0
    assert "bench.json" in {p.name for p in assert_strict(tmp_path / "b")}


def test_finetune_writes_strict_json(tmp_path):
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps({"source": f"sentence {i}", "target": "ok"}) + "\n" for i in range(16)))
    assert main(["finetune", "--base", "tiny-random", "--task", "translation", "--data-file", str(data), "--steps", "2",
                 "--batch-size", "4", "--eval-split", "train", "--eval-examples", "2", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "ft"), "--wandb-mode", "disabled"]) == 0
    assert {"finetune.json", "heldout.json"} <= {p.name for p in assert_strict(tmp_path / "ft")}
