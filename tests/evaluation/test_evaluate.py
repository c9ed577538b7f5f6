"""``speccascade evaluate`` on tiny-random; Pareto fronts and summaries on hand-made points; bad input."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from speccascade.cli import main
from speccascade.decoding.stats import COUNTERS
from speccascade.tracing.log_traces import log_traces
from speccascade.deferral import features as F
from speccascade.deferral.heads import DeferralHead
from speccascade.errors import SpeccascadeError
from speccascade.evaluation.evaluate import LEARNED_RATES, evaluate, plan_points
from speccascade.evaluation.points import Point, calls_against, repetition, summarise
from speccascade.evaluation.summary import pareto_front, summary
from speccascade.uncertainty import resample_weights
from speccascade.training import train_deferral

GAMMA = 3


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-head")
    log_traces(root / "traces", models="tiny-random", task="arithmetic", limit=16, mode="reference", topk=0)
    train_deferral([str(root / "traces")], root / "head", epochs=2, wandb_mode="disabled")
    return root / "head"


def test_evaluate_end_to_end(tmp_path, head):
    out = tmp_path / "eval"
    result = evaluate(out, models="tiny-random", limit=6, rules=f"always,never,opt:0.5,chow,learned:{head}",
                      block_size=GAMMA, max_new_tokens=12, batch_size=4, wandb_mode="offline")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(p.name.endswith(".wandb") for p in runs[0].iterdir())
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.csv", "quality_vs_cost.png", "report.md"}
    points = {p["label"]: p for p in result["points"]}
    assert points["speculative decoding"]["deferral_rate"] == 1.0
    assert points["never"]["deferral_rate"] == 0.0
    assert points["speculative decoding"]["quality"] == points["target only"]["quality"]
    cascades = [p for p in result["points"] if p["rule"] not in ("target",)]
    assert all(1.0 <= p["tokens_per_target_call"] <= GAMMA + 1 for p in cascades)
    assert len([p for p in result["points"] if p["rule"] == "chow"]) == 4  # the default grid
    assert len([p for p in result["points"] if p["rule"] == "learned"]) == 4  # the head's operating points
    learned_rates = [p["deferral_rate"] for p in result["points"] if p["rule"] == "learned"]
    assert learned_rates == sorted(learned_rates)  # lower thresholds defer more
    assert json.loads((out / "results.json").read_text())["target_quality"] == result["target_quality"]
    assert "| speculative decoding |" in (out / "report.md").read_text()
    # per-example records and 95% intervals of every point
    for p in result["points"]:
        records = pq.read_table(out / p["records"]).to_pydict()
        assert len(records["example_id"]) == 6 and sum(records["new_tokens"]) == p["new_tokens"]
        assert sum(records["score"]) / 6 == pytest.approx(p["quality"])
        assert p["quality_low"] <= p["quality"] <= p["quality_high"]
        assert p["difference_low"] <= p["difference"] <= p["difference_high"]
    exact = points["speculative decoding"]  # greedy speculative decoding is the target, example by example
    assert (exact["difference"], exact["difference_low"], exact["difference_high"]) == (0.0, 0.0, 0.0)
    assert exact["reaches_target"] and exact["length_ratio"] == 1.0 and exact["guards"] == []
    assert json.loads((out / "results.json").read_text())["settings"]["margin"] == 0.02
    assert "difference to target" in (out / "report.md").read_text()
    # model calls against exact speculative decoding on the same examples, paired
    sd_calls = pq.read_table(out / exact["records"]).to_pydict()
    assert [exact[f"target_calls_vs_exact{s}"] for s in ("", "_low", "_high")] == [1.0, 1.0, 1.0]
    for p in result["points"]:
        calls = pq.read_table(out / p["records"]).to_pydict()
        for name in ("target_calls", "drafter_calls"):
            assert p[f"{name}_vs_exact"] == pytest.approx(sum(calls[name]) / sum(sd_calls[name]))
            assert p[f"{name}_vs_exact_low"] <= p[f"{name}_vs_exact"] <= p[f"{name}_vs_exact_high"]
    assert points["target only"]["target_calls_vs_exact_low"] > 1  # the target alone calls itself once per token
    assert points["never"]["target_calls_vs_exact"] <= 1  # accepting every draft never needs more calls
    assert "target calls vs exact SD" in (out / "report.md").read_text()


def test_pareto_front_and_summary_on_hand_made_points():
    points = [
        {"label": "a", "quality": 0.5, "relative_latency": 0.4},
        {"label": "b", "quality": 0.7, "relative_latency": 0.6},
        {"label": "c", "quality": 0.6, "relative_latency": 0.8},  # dominated by b
        {"label": "d", "quality": 0.9, "relative_latency": 1.3},
    ]
    assert [p["label"] for p in pareto_front(points)] == ["a", "b", "d"]
    assert summary(points, target_quality=0.7) == {"lowest_latency_at_target_quality": 0.6, "best_quality_within_target_latency": 0.7}
    assert summary(points, target_quality=0.95)["lowest_latency_at_target_quality"] is None


def test_bad_input(tmp_path, head, capsys):
    with pytest.raises(SpeccascadeError, match="unknown rule 'nope'"):
        evaluate(tmp_path / "a", models="tiny-random", limit=2, rules="nope", wandb_mode="disabled")
    with pytest.raises(SpeccascadeError, match="is not a deferral head"):
        evaluate(tmp_path / "b", models="tiny-random", limit=2, rules=f"learned:{tmp_path}", wandb_mode="disabled")
    with pytest.raises(SpeccascadeError, match="has no examples"):
        evaluate(tmp_path / "c", models="tiny-random", task="gsm8k", data_file=str(_empty(tmp_path)), rules="always", wandb_mode="disabled")
    config = json.loads((head / "config.json").read_text())
    config["provenance"]["traces"][0]["target"] = "some/other-model"
    other = tmp_path / "other-head"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((head / "model.safetensors").read_bytes())
    evaluate(tmp_path / "d", models="tiny-random", limit=2, rules=f"learned:{other}@0.5", max_new_tokens=4, wandb_mode="disabled")
    assert "was trained on traces of" in capsys.readouterr().err  # warned, not refused
    assert main(["evaluate", "--models", "tiny-random", "--rules", "bogus", "--out", str(tmp_path / "e")]) == 2


def _empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


def _records(scores, lengths, repetitions):
    n = len(scores)
    return {"example_id": [f"e{i}" for i in range(n)], "score": scores, "new_tokens": lengths, "repetition": repetitions,
            "text": [""] * n, **{name: [1] * n for name in COUNTERS if name != "new_tokens"}}


def test_non_inferiority_and_guards_decide_reaching_the_target():
    weights = resample_weights(40, seed=0)
    target = _records([1.0] * 20 + [0.0] * 20, [20] * 40, [0.0] * 40)
    point = Point("opt", "opt:0.3", 0.3, "opt:0.3")
    same = summarise(point, target, {"wall_s": 1.0}, target, weights, margin=0.02)
    assert same["reaches_target"] and same["difference"] == 0.0
    worse = summarise(point, _records([1.0] * 14 + [0.0] * 26, [20] * 40, [0.0] * 40), {"wall_s": 1.0}, target, weights, 0.02)
    assert worse["difference"] == pytest.approx(-0.15) and worse["difference_high"] < 0 and not worse["reaches_target"]
    lenient = summarise(point, _records([1.0] * 19 + [0.0] * 21, [20] * 40, [0.0] * 40), {"wall_s": 1.0}, target, weights, 0.2)
    assert lenient["non_inferior"] and lenient["reaches_target"]  # one example worse, within a wide margin
    long = summarise(point, _records([1.0] * 20 + [0.0] * 20, [40] * 40, [0.0] * 40), {"wall_s": 1.0}, target, weights, 0.02)
    assert long["length_ratio"] == 2.0 and long["non_inferior"] and not long["reaches_target"] and "as long" in long["guards"][0]
    loops = summarise(point, _records([1.0] * 20 + [0.0] * 20, [20] * 40, [0.9] * 20 + [0.0] * 20), {"wall_s": 1.0},
                      target, weights, 0.02)
    assert loops["looping_rate"] == 0.5 and not loops["reaches_target"] and "loops in 50%" in loops["guards"][0]


def test_calls_against_exact_decoding_are_paired_ratios():
    weights = resample_weights(40, seed=0)
    exact = {"target_calls": [4] * 40, "drafter_calls": [20] * 40}
    fewer = {"target_calls": [3] * 10 + [4] * 30, "drafter_calls": [15] * 10 + [20] * 30}
    ratios = calls_against(fewer, exact, weights)
    assert ratios["target_calls_vs_exact"] == pytest.approx(150 / 160) and ratios["drafter_calls_vs_exact"] == pytest.approx(0.9375)
    # never more calls on any example, so no resample reaches 1; some examples save, so the interval has width
    assert ratios["target_calls_vs_exact_low"] < ratios["target_calls_vs_exact"] < ratios["target_calls_vs_exact_high"] < 1
    one_example = {"target_calls": [3] + [4] * 39, "drafter_calls": [20] * 40}
    assert calls_against(one_example, exact, weights)["target_calls_vs_exact_high"] == 1.0  # resamples without it
    missing = calls_against(fewer, None, weights)
    assert all(value != value for value in missing.values())  # NaN without exact decoding to compare with


def test_repetition_rate_of_a_reply():
    assert repetition([1, 2, 3, 4, 5, 6, 7]) == 0.0
    assert repetition([7] * 12) == pytest.approx(1 - 1 / 9)  # nine 4-grams, all the same
    assert repetition([1, 2, 3]) == 0.0


def test_adaptive_blocks_keep_exact_decoding_exact_and_draft_less(tmp_path):
    """``--draft-stop``: exact speculative decoding still equals the target, example by example, with fewer
    drafts per target call; the run's configuration records the setting (a resume with another is refused)."""
    options = dict(models="tiny-random", limit=4, rules="always", block_size=4, max_new_tokens=12, wandb_mode="disabled")
    fixed = evaluate(tmp_path / "fixed", **options)
    adaptive = evaluate(tmp_path / "adaptive", draft_stop=0.1, **options)
    exact = {r["label"]: r for r in adaptive["points"]}["speculative decoding"]
    assert exact["quality"] == adaptive["target_quality"] and exact["difference"] == 0.0
    assert exact["drafter_calls"] < {r["label"]: r for r in fixed["points"]}["speculative decoding"]["drafter_calls"]
    with pytest.raises(SpeccascadeError, match="draft_stop"):
        evaluate(tmp_path / "adaptive", draft_stop=0.2, resume=True, **options)


def test_a_heads_recorded_rates_are_matched_as_numbers_not_text(tmp_path):
    head = DeferralHead(list(F.POSITION_FEATURES), hidden=4, depth=1,
                        operating_points={"0.20": 0.7, "4e-1": 0.6, "0.6000": 0.55, "0.9": 0.1, "default": 0.5})
    head.save(tmp_path / "head")
    loaded = DeferralHead.load(tmp_path / "head")
    assert loaded.thresholds() == {0.2: 0.7, 0.4: 0.6, 0.6: 0.55, 0.9: 0.1}
    knobs = [p.point.knob for p in plan_points(f"learned:{tmp_path / 'head'}") if p.point.rule == "learned"]
    assert knobs == [0.7, 0.6, 0.55] and 0.8 in LEARNED_RATES  # 0.8 recorded by no head here: left out
    head.record_thresholds({0.2: 0.3}, default=0.25)
    assert head.operating_points == {"0.2": 0.3, "default": 0.25} and head.thresholds() == {0.2: 0.3}


def test_decoding_a_point_reports_each_batch_as_it_ends(pair, tmp_path):
    """The progress bar within a point: ``done`` hears every batch's example count, in order."""
    from speccascade.data.tasks import get_task
    from speccascade.decoding import Autoregressive
    from speccascade.evaluation.evaluate import EvaluateSettings, decode

    task = get_task("arithmetic")
    examples = task.examples("test", limit=5)
    settings = EvaluateSettings(out=tmp_path, models="tiny-random", batch_size=2, max_new_tokens=3)
    heard = []
    records, _ = decode(Autoregressive(pair, "target", temperature=0), pair, examples, task, settings, heard.append)
    assert heard == [2, 2, 1] and records["example_id"] == [ex.id for ex in examples]


def test_an_interrupted_point_continues_after_its_last_whole_batch(tmp_path, monkeypatch):
    """Sampled decoding, so a batch decoded with the wrong seeds would show: a point interrupted in its second
    batch keeps its first in a partial file, and --resume decodes only the two batches left and ends with the
    records of an uninterrupted run, its partial file gone; a damaged partial file is decoded from the start."""
    import importlib
    import shutil

    E = importlib.import_module("speccascade.evaluation.evaluate")  # the module (the package exports its function)

    options = dict(models="tiny-random", limit=5, batch_size=2, max_new_tokens=6, block_size=GAMMA, temperature=1.0,
                   rules="always", wandb_mode="disabled")
    expected = evaluate(tmp_path / "full", **options)
    turns, calls = E._turns, []

    def interrupted_at(n: int):
        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return turns(*args, **kwargs)
        return counted

    out = tmp_path / "interrupted"
    monkeypatch.setattr(E, "_turns", interrupted_at(5))  # the target's 3 batches, then exact decoding's first and second
    with pytest.raises(KeyboardInterrupt):
        evaluate(out, **options)
    [partial] = (out / "points").glob("*.partial.parquet")
    assert pq.read_table(partial).num_rows == 2 and len(list((out / "points").glob("*.json"))) == 1
    shutil.copytree(out, tmp_path / "damaged")
    partial.with_name("x").write_bytes(b"")  # a stray file is not a partial point

    for directory, batches in ((out, 2), (tmp_path / "damaged", 3)):
        if directory.name == "damaged":
            next((directory / "points").glob("*.partial.parquet")).write_bytes(b"PAR1 cut short")
        calls.clear()
        monkeypatch.setattr(E, "_turns", interrupted_at(0))
        resumed = evaluate(directory, resume=True, **options)
        assert len(calls) == batches
        assert not list((directory / "points").glob("*.partial.parquet"))
        untimed = lambda result: [{k: v for k, v in p.items() if k not in ("wall_s", "relative_latency")}  # noqa: E731
                                  for p in result["points"]]
        assert untimed(resumed) == untimed(expected)
        records = [pq.read_table(d / "points" / p.name).to_pydict() for d in (directory, tmp_path / "full")
                   for p in sorted((tmp_path / "full" / "points").glob("*.parquet"))]
        assert records[: len(records) // 2] == records[len(records) // 2 :]


def test_two_processes_decode_the_records_of_one(tmp_path):
    """--devices 2: process 1 decodes every other batch (here the second of three, the last one short) and process 0
    puts the shares together into the records one process writes (sampled decoding: a batch decoded with another
    batch's seeds would show), reports once, and leaves no share behind."""
    import os
    import subprocess
    import sys

    args = ["--models", "tiny-random", "--task", "arithmetic", "--limit", "5", "--batch-size", "2", "--max-new-tokens",
            "6", "--temperature", "1.0", "--rules", "target,always", "--wandb-mode", "disabled", "--accelerator", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    printed = {}
    for name, extra in (("one", []), ("two", ["--devices", "2"])):
        run = subprocess.run([sys.executable, "-m", "speccascade.cli", "evaluate", "--out", str(tmp_path / name), *args,
                              *extra], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        printed[name] = run.stdout
    for name, text in printed.items():  # process 0 alone reports
        assert text.count(str(tmp_path / name / "results.json")) == 1
    points = sorted(p.name for p in (tmp_path / "one" / "points").glob("*.parquet"))
    assert len(points) == 2 and sorted(p.name for p in (tmp_path / "two" / "points").glob("*.parquet")) == points
    for name in points:
        one, two = (pq.read_table(tmp_path / d / "points" / name).to_pydict() for d in ("one", "two"))
        assert len(one["example_id"]) == 5 and two == one


def test_a_process_share_resumes_and_the_shares_make_one_processs_records(tmp_path, monkeypatch):
    """The two processes of --devices 2, run one after the other: process 1, interrupted in the second of its
    batches (the first and third of 4, the last one short), keeps its first in its own partial file and, run again,
    decodes only the one left; process 0 then decodes its own and puts both shares together into the records one
    process writes (sampled decoding: a batch decoded with the wrong seeds would show)."""
    import importlib
    from types import SimpleNamespace

    from speccascade.decoding import load_pair
    from speccascade.evaluation.points import PointStore

    E = importlib.import_module("speccascade.evaluation.evaluate")
    options = dict(models="tiny-random", limit=7, batch_size=2, max_new_tokens=6, temperature=1.0, rules="target",
                   wandb_mode="disabled")
    evaluate(tmp_path / "one", **options)
    pair, plan = load_pair("tiny-random"), E.resolve(E.EvaluateSettings(out=tmp_path / "two", **options))
    store, turns, calls = PointStore(tmp_path / "two"), E._turns, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return turns(*args, **kwargs)

    monkeypatch.setattr(E, "_turns", counted)
    process = lambda rank: SimpleNamespace(global_rank=rank, world_size=2, barrier=lambda: None)  # noqa: E731
    stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        E._decode_points(plan, pair, store, process(1))
    [partial] = (tmp_path / "two" / "points").glob("*.rank1-of-2.partial.parquet")
    assert pq.read_table(partial).num_rows == 2
    calls.clear()
    stop_at = 0
    assert E._decode_points(plan, pair, store, process(1)) == [] and len(calls) == 1
    [(point, records, totals)] = E._decode_points(plan, pair, store, process(0))
    assert len(calls) == 3 and not list((tmp_path / "two" / "points").glob("*.partial.parquet"))
    [one] = (tmp_path / "one" / "points").glob("*.parquet")
    assert records == pq.read_table(one).to_pydict()
    sidecar = json.loads(one.with_suffix(".json").read_text())
    assert {name: totals[name] for name in ("target_forwards", "drafter_forwards")} == {
        name: sidecar[name] for name in ("target_forwards", "drafter_forwards")}


def test_rows_decode_each_batch_with_continuous_batching_and_the_same_records(tmp_path, monkeypatch):
    """--rows 2 in batches of 5: two rows decode at a time, the batch's other examples joining as rows finish
    (sampled decoding); every record is the one the whole batch decodes, and a run may resume with another --rows."""
    from speccascade.decoding.state import Slots

    joins = []
    replace = Slots.replace
    monkeypatch.setattr(Slots, "replace", lambda self, rows, ids, *a: joins.append(len(ids)) or replace(self, rows, ids, *a))
    options = dict(models="tiny-random", limit=7, batch_size=5, max_new_tokens=8, temperature=1.0, rules="target,opt:0.5",
                   wandb_mode="disabled")
    evaluate(tmp_path / "whole", **options)
    assert not joins
    evaluate(tmp_path / "rows", rows=2, **options)
    assert sum(joins) == 2 * (5 - 2)  # two points; each first batch's three waiting examples join (the second has 2)
    for path in sorted((tmp_path / "whole" / "points").glob("*.parquet")):
        assert pq.read_table(tmp_path / "rows" / "points" / path.name).to_pydict() == pq.read_table(path).to_pydict()
    assert evaluate(tmp_path / "rows", resume=True, rows=3, **options)["points"]  # --rows is no setting of the records
