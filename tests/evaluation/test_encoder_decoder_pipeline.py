"""log-traces (both modes) and evaluate end to end for an encoder-decoder pair on a summarisation fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import load_dataset

from speccascade.tracing.log_traces import log_traces
from speccascade.evaluation.evaluate import evaluate

FIXTURES = Path(__file__).parents[1] / "fixtures"
FIXTURE = str(FIXTURES / "summarisation.jsonl")
T5 = dict(models="tiny-random-t5", task="summarisation", data_file=FIXTURE)


@pytest.mark.parametrize("mode", ["reference", "on-policy"])
def test_log_traces_for_a_t5_pair(tmp_path, mode):
    manifest = log_traces(tmp_path, mode=mode, limit=6, batch_size=4, max_new_tokens=10, topk=2, hidden_states="both", **T5)
    assert manifest["complete"] and manifest["examples"] == 6 and manifest["target"] == "tiny-random-t5/2-layer"
    rows = load_dataset("parquet", data_files=[str(tmp_path / s["file"]) for s in manifest["shards"]], split="train")
    assert rows.num_rows == manifest["rows"] > 0
    table = rows.with_format("torch")[:]
    assert ((table["tv"] >= 0) & (table["tv"] <= 1 + 1e-6)).all()
    assert len(rows[0]["q_hidden"]) == len(rows[0]["p_hidden"]) == 64  # the decoders' last hidden states
    if mode == "reference":  # one row per summary token (+ EOS), teacher-forced through the decoder
        assert rows.num_rows == sum(len(r["summary"].encode()) + 1 for r in load_dataset("json", data_files=FIXTURE, split="train"))
        assert (table["position"].max() + 1) == max(len(r["summary"].encode()) + 1 for r in load_dataset("json", data_files=FIXTURE, split="train"))
    else:
        assert table["deferred"][table["examined"]].all()


def test_evaluate_a_t5_pair(tmp_path):
    result = evaluate(tmp_path, rules="always,never,opt:0.3,tokenv3:0.3", limit=6, block_size=3, max_new_tokens=10,
                      batch_size=4, wandb_mode="disabled", **T5)
    points = {p["label"]: p for p in result["points"]}
    assert points["speculative decoding"]["quality"] == points["target only"]["quality"]
    assert points["speculative decoding"]["deferral_rate"] == 1.0 and points["never"]["deferral_rate"] == 0.0
    assert all(1.0 <= p["tokens_per_target_call"] <= 4 for p in result["points"] if p["rule"] != "target")
    assert (tmp_path / "report.md").exists()


def test_translation_traces_and_evaluation_for_a_t5_pair(tmp_path):
    data = str(FIXTURES / "translation.jsonl")
    manifest = log_traces(tmp_path / "traces", models="tiny-random-t5", task="translation", data_file=data, mode="on-policy",
                          limit=4, max_new_tokens=8)
    assert manifest["complete"] and manifest["rows"] > 0
    result = evaluate(tmp_path / "eval", models="tiny-random-t5", task="translation", data_file=data, rules="always,opt:0.3",
                      limit=4, block_size=3, max_new_tokens=8, wandb_mode="disabled")
    points = {p["label"]: p for p in result["points"]}
    assert points["speculative decoding"]["quality"] == points["target only"]["quality"]
