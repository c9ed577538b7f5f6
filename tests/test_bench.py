"""``speccascade bench`` in a tiny smoke configuration, so that it keeps working (its numbers are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from speccascade.bench import bench, ideal_speedup
from speccascade.bench.measure import count_new
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


def test_bench_times_the_cascade_rules_it_is_given(tmp_path):
    report = bench(tmp_path, models="tiny-random", batch_sizes="1", prompts=1, max_new_tokens=4, repeats=1,
                   rules="gain:0.2,diff:0.1")
    cascades = [r for r in report["results"] if r["name"].startswith("cascade")]
    assert [r["name"] for r in cascades] == ["cascade gain:0.2", "cascade diff:0.1"]
    assert all(r["new_tokens"] > 0 for r in cascades) and report["rules"] == ["gain:0.2", "diff:0.1"]


def test_bench_with_draft_stop_times_adaptive_exact_decoding_beside_fixed_blocks(tmp_path):
    report = bench(tmp_path, models="tiny-random", batch_sizes="1", prompts=2, max_new_tokens=8, repeats=1,
                   rules="opt:0.3", draft_stop=0.1)
    rows = {r["name"]: r for r in report["results"]}
    adaptive, fixed = rows["exact speculative decoding, drafts stop below 0.1"], rows["exact speculative decoding"]
    assert adaptive["new_tokens"] == fixed["new_tokens"] == rows["target alone"]["new_tokens"]  # greedy and exact
    assert "cascade opt:0.3, drafts stop below 0.1" in rows and report["draft_stop"] == 0.1
    assert "drafts stop below 0.1" in (tmp_path / "bench.md").read_text()


def test_ideal_speedup_is_the_section_7_formula():
    assert ideal_speedup(0.0, 5, 0.1) == pytest.approx(1 / 1.5)  # every draft rejected: one token per block
    assert ideal_speedup(1.0, 5, 0.1) == pytest.approx(6 / 1.5)  # every draft accepted
    assert ideal_speedup(0.5, 3, 0.2) == pytest.approx((1 - 0.5**4) / (0.5 * 1.6))


def test_count_new_stops_at_the_first_eos():
    new = torch.tensor([[5, 7, 2, 9], [5, 6, 7, 8]])
    assert count_new(new, [2]) == 3 + 4
    assert count_new(new, []) == 8


def test_bench_refuses_bad_batch_sizes(tmp_path, capsys):
    assert main(["bench", "--models", "tiny-random", "--out", str(tmp_path), "--prompts", "2", "--batch-sizes", "1,4"]) == 2
    assert "batch sizes must lie in [1, prompts=2]" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU exists")
def test_bench_refuses_cuda_without_a_gpu(tmp_path, capsys):
    assert main(["bench", "--models", "tiny-random", "--out", str(tmp_path / "b"), "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in one_error_line(capsys)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("setting, message", [
    ("alpha: .nan", "alpha must be a finite number"),
    ("repeats: 0", "repeats must be >= 1"),
    ("device: tpu", "device must be cpu, cuda or cuda:N"),
    ("cache: paged", "cache must be one of dynamic, static"),
    ("compile: true", "compile needs the static cache"),
    ("rules: bogus:1", "unknown rule"),
    ("bonus: pi", "--bonus: expected one of mix, target, got pi"),
    ("draft_stop: 1", "--draft-stop must be < 1, got 1"),
    ("draft_stop: 0.4\ncache: static", "--draft-stop needs the dynamic cache"),
    ("rules: 'gain:0.2,,opt:0.1'", "has an empty item"),
])
def test_bench_refuses_bad_settings_in_a_config_before_any_work(tmp_path, capsys, setting, message):
    config = tmp_path / "bench.yaml"
    config.write_text(f"models: tiny-random\nout: {tmp_path / 'b'}\n{setting}\n")
    assert main(["bench", "--config", str(config)]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "b").exists()


def test_bench_refuses_an_out_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["bench", "--models", "tiny-random", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in one_error_line(capsys)
