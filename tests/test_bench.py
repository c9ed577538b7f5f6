"""``speccascade bench`` in a tiny smoke configuration, so that it keeps working (its numbers are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from speccascade.bench import bench, ideal_speedup
from speccascade.bench.measure import Configuration, configurations, count_new
from speccascade.bench.report import speedup_interval
from speccascade.uncertainty import resample_weights
from speccascade.cli import main
from speccascade.deferral import rules as R
from speccascade.pairs import load_pair

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
        batches = 2 // r["batch_size"]  # 2 prompts: two batches of 1 or one of 2
        assert len(r["batch_seconds"][0]) == len(r["batch_tokens"]) == batches and sum(r["batch_tokens"]) == r["new_tokens"]
        assert sum(r["batch_seconds"][0]) == pytest.approx(r["seconds"][0])
        ci = r["speedup_vs_target_ci"]
        assert (ci is None) == (r["batch_size"] != 1)  # prompts are the resampled unit: batch-1 rows only
        assert ci is None or ci["low"] <= ci["estimate"] <= ci["high"]
    assert results[("target alone", 1)]["speedup_vs_target_ci"] == {"estimate": 1.0, "low": 1.0, "high": 1.0}
    for r in saved["results"]:  # every row's time split: each model's forwards are timed on their own
        ms = r["split_ms"]
        assert 0 <= r["overhead_share"] < 1 and min(ms.values()) >= 0, r["name"]
        assert (ms["drafter"] > 0) == (r["name"] not in ("target, generate", "target alone")), r["name"]
        assert (ms["target"] > 0) == (r["name"] != "drafter alone"), r["name"]
    for name in ("exact speculative decoding", "cascade opt:0.3"):
        assert 0 < results[(name, 1)]["forward_share"] <= 1
        assert 1 <= results[(name, 1)]["tokens_per_target_call"] <= 6
    assert saved["cost_ratio_c"] > 0 and saved["ideal_speedup"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "| exact speculative decoding | speccascade | 2 |" in table and "assisted generation" in table
    assert "| exact speculative decoding | 2 | " in table.split("Time per decoder step")[1]
    for name in ("cascade opt:0.3", "cascade tokenv3:0.3"):  # paired with exact decoding on the same prompts
        ci = results[(name, 1)]["speedup_vs_exact_sd_ci"]
        assert ci["low"] <= ci["estimate"] <= ci["high"] and f"- {name}: {ci['estimate']:.2f}x [" in table
    assert "speedup_vs_exact_sd_ci" not in results[("exact speculative decoding", 1)]


def test_bench_times_the_cascade_rules_it_is_given(tmp_path):
    report = bench(tmp_path, models="tiny-random", batch_sizes="1", prompts=1, max_new_tokens=4, repeats=1,
                   rules="gain:0.2,diff:0.1")
    cascades = [r for r in report["results"] if r["name"].startswith("cascade")]
    assert [r["name"] for r in cascades] == ["cascade gain:0.2", "cascade diff:0.1"]
    assert all(r["new_tokens"] > 0 for r in cascades) and report["rules"] == ["gain:0.2", "diff:0.1"]


def test_bench_without_transformers_times_only_speccascade_rows(tmp_path, capsys):
    code = main(["bench", "--models", "tiny-random", "--batch-sizes", "1", "--prompts", "2", "--max-new-tokens", "4",
                 "--repeats", "1", "--rules", "gain:0.2", "--no-transformers", "--out", str(tmp_path)])
    printed = capsys.readouterr().out  # the table as bench.md holds it, then where both files are
    assert printed.endswith((tmp_path / "bench.md").read_text() + f"\nbench: wrote {tmp_path / 'bench.md'}, "
                            f"{tmp_path / 'bench.json'}\n") and "| configuration | implementation |" in printed
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert code == 0 and saved["transformers_rows"] is False
    assert [r["name"] for r in saved["results"]] == ["target alone", "drafter alone", "cascade gain:0.2",
                                                     "exact speculative decoding"]
    assert all(r["implementation"] == "speccascade" for r in saved["results"])
    assert saved["goals"].keys() == {"efficiency", "overhead"}  # no assisted-generation row to compare with
    assert "assisted generation" not in (tmp_path / "bench.md").read_text()
    assert saved["results"][2]["speedup_vs_exact_sd_ci"]["low"] > 0


def test_bench_with_draft_stop_times_adaptive_exact_decoding_beside_fixed_blocks(tmp_path):
    report = bench(tmp_path, models="tiny-random", batch_sizes="1", prompts=2, max_new_tokens=8, repeats=1,
                   rules="opt:0.3", draft_stop=0.1)
    rows = {r["name"]: r for r in report["results"]}
    adaptive, fixed = rows["exact speculative decoding, drafts stop below 0.1"], rows["exact speculative decoding"]
    assert adaptive["new_tokens"] == fixed["new_tokens"] == rows["target alone"]["new_tokens"]  # greedy and exact
    assert "cascade opt:0.3, drafts stop below 0.1" in rows and report["draft_stop"] == 0.1
    assert "drafts stop below 0.1" in (tmp_path / "bench.md").read_text()
    assert "Cascades against exact speculative decoding, drafts stop below 0.1" in (tmp_path / "bench.md").read_text()


def test_spec_benchs_table_takes_the_rows_flagged_for_it_whatever_their_names():
    configs = configurations(load_pair("tiny-random"), [1, 2], 3, [R.OPT(0.3)], 4, {"cache": None, "compile": False},
                             {"bonus": "mix", "draft_stop": 0.1})
    flagged = {(c.name, c.batch_size): c.in_spec_bench for c in configs}
    assert flagged == {
        ("target, generate", 1): False, ("assisted generation", 1): True, ("assisted generation, adaptive drafts", 1): True,
        ("target alone", 1): True, ("drafter alone", 1): False, ("cascade opt:0.3, drafts stop below 0.1", 1): True,
        ("exact speculative decoding, drafts stop below 0.1", 1): True, ("exact speculative decoding", 1): True,
        ("exact speculative decoding", 2): True,
    }
    fixed = configurations(load_pair("tiny-random"), [1], 3, [], 4, {"cache": None, "compile": False},
                           {"bonus": "mix", "draft_stop": 0.0})
    assert not next(c for c in fixed if c.name == "assisted generation, adaptive drafts").in_spec_bench  # only beside --draft-stop


def timed_config(name: str, tokens: list[int], rounds: list[list[float]]) -> Configuration:
    return Configuration(name, "speccascade", 1, run=None, batch_seconds=rounds, batch_tokens=tokens)


def test_the_speedup_interval_resamples_prompts_paired_and_times_each_prompt_by_its_median_round():
    base = timed_config("target alone", [10, 20, 30, 40], [[1.0, 2.0, 3.0, 4.0]] * 3)
    weights = resample_weights(4)
    # twice as fast on every prompt: 2x whatever prompts are drawn; one slow round (a busy machine) is outvoted
    double = timed_config("fast", [10, 20, 30, 40], [[0.5, 1.0, 1.5, 2.0], [0.5, 1.0, 1.5, 2.0], [9.0, 9.0, 9.0, 9.0]])
    assert speedup_interval(double, base, weights).as_dict() == pytest.approx({"estimate": 2.0, "low": 2.0, "high": 2.0})
    # 3x faster on two prompts, 3x slower on the other two: the estimate is their pooled ratio and the interval
    # is wide enough to hold both a gain and a loss
    mixed = timed_config("mixed", [10, 20, 30, 40], [[1 / 3, 2 / 3, 9.0, 12.0]] * 3)
    interval = speedup_interval(mixed, base, weights)
    assert interval.estimate == pytest.approx(10 / 22)  # 100 tokens in 22 s against 100 tokens in 10 s
    assert interval.low < 0.6 and interval.high > 1.0 and interval.covers(interval.estimate)


def test_configurations_take_turns_on_each_chunk_of_prompts_and_the_warm_up_round_is_dropped():
    from types import SimpleNamespace

    from speccascade.bench.command import measure
    from speccascade.decoding import DecodeStats

    log = []

    def recorder(name):
        def run(ids, mask):
            log.append((name, ids[:, -1].tolist()))
            return DecodeStats(new_tokens=ids.shape[0])
        return run

    single, pairwise = (Configuration(n, "transformers", b, recorder(n)) for n, b in (("one", 1), ("two", 2)))
    ids = torch.arange(4).unsqueeze(1)  # four one-token prompts, 0-3
    measure([single, pairwise], SimpleNamespace(device=torch.device("cpu")), ids, torch.ones_like(ids), repeats=2)
    one_round = [("one", [0]), ("one", [1]), ("two", [0, 1]), ("one", [2]), ("one", [3]), ("two", [2, 3])]
    assert log == one_round * 3  # a warm-up and two timed rounds, in turns of one largest batch
    assert len(single.seconds) == len(single.batch_seconds) == 2 and [len(b) for b in single.batch_seconds] == [4, 4]
    assert single.batch_tokens == [1, 1, 1, 1] and pairwise.batch_tokens == [2, 2] and single.stats.new_tokens == 4


def test_a_refilling_configuration_decodes_each_chunk_in_one_call():
    """``--chunk`` above the largest batch: a row that refills takes the chunk whole, the others batch by batch."""
    from types import SimpleNamespace

    from speccascade.bench.command import measure
    from speccascade.decoding import DecodeStats

    log = []
    run = lambda name: lambda ids, mask: log.append((name, ids[:, -1].tolist())) or DecodeStats(new_tokens=ids.shape[0])  # noqa: E731
    fixed, refilling = Configuration("fixed", "speccascade", 2, run("fixed")), Configuration("refilling", "speccascade", 2,
                                                                                           run("refilling"), refills=True)
    ids = torch.arange(6).unsqueeze(1)
    measure([fixed, refilling], SimpleNamespace(device=torch.device("cpu")), ids, torch.ones_like(ids), repeats=1, chunk=3)
    one_round = [("fixed", [0, 1]), ("fixed", [2]), ("refilling", [0, 1, 2]), ("fixed", [3, 4]), ("fixed", [5]),
                 ("refilling", [3, 4, 5])]
    assert log == one_round * 2 and refilling.batch_tokens == [3, 3]


def test_exact_decoding_above_batch_1_refills_its_rows():
    configs = configurations(load_pair("tiny-random"), [1, 2], 3, [], 4, {"cache": None, "compile": False},
                             {"bonus": "mix", "draft_stop": 0.0}, transformers_rows=False)
    assert {(c.name, c.batch_size): c.refills for c in configs if c.refills or c.batch_size > 1} == {
        ("exact speculative decoding", 2): True}


def test_bench_refuses_a_chunk_below_the_largest_batch(tmp_path, capsys):
    args = ["bench", "--models", "tiny-random", "--out", str(tmp_path), "--prompts", "4", "--batch-sizes", "1,4"]
    assert main([*args, "--chunk", "2"]) == 2
    assert one_error_line(capsys) == "error: --chunk 2: a chunk must lie in [the largest batch size 4, prompts=4]"
    assert not (tmp_path / "bench.json").exists()


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


def test_forward_clock_times_each_model_and_leaves_it_as_it_was():
    """The clock counts each model's forwards (``inside`` while one runs), keeps ``forward``'s signature for
    callers that read it (transformers' generate, the cache adapter), and leaves no attribute behind."""
    import inspect
    from types import SimpleNamespace

    from speccascade.bench.measure import ForwardClock

    drafter, target = torch.nn.Linear(3, 3), torch.nn.Bilinear(3, 3, 3)
    signatures = {m: inspect.signature(m.forward) for m in (drafter, target)}
    clock = ForwardClock(SimpleNamespace(drafter=drafter, target=target, device=torch.device("cpu")))
    seen = []
    drafter.register_forward_pre_hook(lambda *_: seen.append(clock.inside))
    x = torch.ones(2, 3)
    with clock:
        assert inspect.signature(target.forward) == signatures[target]
        drafter(x), drafter(x), target(x, x)
        seen.append(clock.inside)
    assert clock.calls == {"drafter": 2, "target": 1} and all(s > 0 for s in clock.seconds.values())
    assert seen == [False, False, False]  # hooks run before the forward itself, and nothing is open after
    assert "forward" not in vars(drafter) and "forward" not in vars(target)
    assert torch.equal(drafter(x), torch.nn.functional.linear(x, drafter.weight, drafter.bias))
    same = torch.nn.Linear(3, 3)  # one model in both roles
    with ForwardClock(SimpleNamespace(drafter=same, target=same, device=torch.device("cpu"))) as both:
        same(x)
    assert both.calls == {"drafter": 1, "target": 1} and "forward" not in vars(same)
