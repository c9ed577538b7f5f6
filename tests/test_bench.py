"""``speccascade bench`` in a tiny smoke configuration, so that it keeps working (its numbers are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.bench import _count_new, _ideal_speedup, bench
from speccascade.cli import main

CONFIGS = {
    ("target, generate", 1), ("assisted generation", 1), ("assisted generation, adaptive drafts", 1), ("target alone", 1),
    ("drafter alone", 1),
    ("cascade opt:0.3", 1), ("cascade tokenv3:0.3", 1), ("exact speculative decoding", 1), ("exact speculative decoding", 2),
}


def test_bench_smoke_writes_every_configuration(tmp_path):
    report = bench(tmp_path, models="tiny-random", batch_sizes="1,2", prompts=2, max_new_tokens=6, repeats=1)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["goals"].keys() == report["goals"].keys() == {"exact_sd_vs_assisted", "efficiency", "overhead"}
    results = {(r["name"], r["batch_size"]): r for r in saved["results"]}
    assert results.keys() == CONFIGS
    # greedy and exact: transformers' generate, assisted generation, our target and our exact SD emit the same tokens
    exact = [results[k]["new_tokens"] for k in CONFIGS if k[0].startswith(("target", "assisted"))
             or k[0] == "exact speculative decoding"]
    assert len(set(exact)) == 1 and exact[0] > 0
    for r in saved["results"]:
        assert len(r["seconds"]) == 1 and r["tokens_per_s"] > 0
    for name in ("exact speculative decoding", "cascade opt:0.3"):
        assert 0 < results[(name, 1)]["forward_share"] <= 1
        assert 1 <= results[(name, 1)]["tokens_per_target_call"] <= 6
    assert saved["cost_ratio_c"] > 0 and saved["ideal_speedup"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "| exact speculative decoding | speccascade | 2 |" in table and "assisted generation" in table


def test_ideal_speedup_is_the_section_7_formula():
    assert _ideal_speedup(0.0, 5, 0.1) == pytest.approx(1 / 1.5)  # every draft rejected: one token per block
    assert _ideal_speedup(1.0, 5, 0.1) == pytest.approx(6 / 1.5)  # every draft accepted
    assert _ideal_speedup(0.5, 3, 0.2) == pytest.approx((1 - 0.5**4) / (0.5 * 1.6))


def test_count_new_stops_at_the_first_eos():
    new = torch.tensor([[5, 7, 2, 9], [5, 6, 7, 8]])
    assert _count_new(new, [2], pad=0) == 3 + 4
    assert _count_new(new, [], pad=0) == 8


def test_bench_refuses_bad_batch_sizes(tmp_path, capsys):
    assert main(["bench", "--models", "tiny-random", "--out", str(tmp_path), "--prompts", "2", "--batch-sizes", "1,4"]) == 2
    assert "batch sizes must lie in [1, prompts=2]" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()
