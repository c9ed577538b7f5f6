"""The held-out offline comparison: curves from scores, intervals that resample examples and cover
the truth, a planted head that wins, and the command end to end on tiny-random traces."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from speccascade.cli import main
from speccascade.data import traces
from speccascade.tracing.log_traces import log_traces
from speccascade.deferral import features as F
from speccascade.deferral import rules as R
from speccascade.evaluation import offline
from speccascade.evaluation.compare import compare
from speccascade.evaluation.report import comparison_markdown, comparison_text
from speccascade.training import train_deferral


def planted_traces(directory, examples: int, seed: int, rows: int = 20):
    """Random features; the drafter is worse on average, and only where ``kl_qp`` is high, which no rule reads."""
    rng = np.random.default_rng(seed)
    n = examples * rows
    cols = {name: rng.random(n).astype(np.float32) for name in F.POSITION_FEATURES}
    gap = np.where(cols["kl_qp"] > 0.6, 0.5, 0.0) + rng.normal(0, 0.05, n)
    cols |= {"loss_p": np.full(n, 0.2, np.float32), "gap": gap.astype(np.float32)}
    cols["loss_q"] = (cols["loss_p"] + cols["gap"]).astype(np.float32)
    ids = np.repeat([f"s{seed}-{i:04d}" for i in range(examples)], rows).astype(object)
    traces.ShardWriter(directory, rank=0).write({"example_id": ids} | cols, sorted(set(ids)))
    traces.write_manifest(directory, {"config": {}, "feature_spec": F.spec()}, complete=True)
    return directory


def synthetic(examples: int, seed: int, repeat: int = 1) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Rows whose losses share an example effect (so rows of one example are not independent);
    deferring pays where the drafter is unsure (low ``q_top1``). ``repeat`` copies every row."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 30, examples)
    example = np.repeat(np.arange(examples), sizes)
    effect = rng.normal(0, 0.15, examples)[example]
    q_top1 = rng.random(len(example))
    loss_p = np.clip(0.25 + effect + rng.normal(0, 0.05, len(example)), 0, 1)
    loss_q = np.clip(loss_p + 0.6 * (1 - q_top1) ** 2 + rng.normal(0, 0.05, len(example)), 0, 1)
    cols = {"q_top1": q_top1, "loss_q": loss_q, "loss_p": loss_p}
    cols = {k: torch.tensor(np.repeat(v, repeat), dtype=torch.float32) for k, v in cols.items()}
    return cols, np.repeat(example, repeat).astype(str)


def test_curve_matches_the_rule_at_its_knobs():
    cols, ids = synthetic(40, seed=0)
    _, example = np.unique(ids, return_inverse=True)
    rule = R.Chow()
    c = offline.curve(rule.score(cols).double().numpy(), example, cols["loss_q"].double().numpy(),
                      cols["loss_p"].double().numpy(), 40)
    for k in (0, 50, 120, 200):  # the curve's point k is the rule at knob k, decided row by row
        defer = R.Chow(alpha=float(c.knobs[k])).decide(cols).numpy()
        emitted = np.where(defer, cols["loss_p"].numpy(), cols["loss_q"].numpy())
        assert c.deferred[k].sum() == defer.sum()
        assert c.loss[k].sum() == pytest.approx(emitted.sum(), rel=1e-5)
    assert c.deferred[0].sum() == 0 and c.deferred[-1].sum() == len(ids)  # keep all ... defer all


def test_intervals_cover_the_truth_in_simulation():
    truth = offline.compare_columns(*synthetic(20000, seed=999), rules="chow", resamples=10, oracle=False)
    truth_rate = truth["candidates"]["chow"]["rate_to_close"]["0.75"]["estimate"]
    truth_area = truth["candidates"]["chow"]["area"]["estimate"]
    covered = np.zeros(2)
    trials = 60
    for trial in range(trials):
        res = offline.compare_columns(*synthetic(150, seed=trial), rules="chow", resamples=300, seed=trial, oracle=False)
        rate, area = res["candidates"]["chow"]["rate_to_close"]["0.75"], res["candidates"]["chow"]["area"]
        covered += [rate["low"] <= truth_rate <= rate["high"], area["low"] <= truth_area <= area["high"]]
    assert np.all(covered / trials >= 0.85), covered / trials


def test_bootstrap_resamples_examples_not_rows():
    once = offline.compare_columns(*synthetic(120, seed=5), rules="chow", oracle=False)["candidates"]["chow"]["area"]
    tenfold = offline.compare_columns(*synthetic(120, seed=5, repeat=10), rules="chow", oracle=False)["candidates"]["chow"]["area"]
    # ten copies of every row add no information about new examples: the interval keeps its width
    assert tenfold["estimate"] == pytest.approx(once["estimate"], rel=0.01)  # knobs sit at quantiles of the rows
    assert (tenfold["high"] - tenfold["low"]) == pytest.approx(once["high"] - once["low"], rel=0.05)


def test_planted_head_beats_every_rule_on_held_out_traces(tmp_path):
    train = planted_traces(tmp_path / "train", examples=200, seed=0)
    held_out = planted_traces(tmp_path / "test", examples=150, seed=1)
    train_deferral([str(train)], tmp_path / "head", epochs=10, batch_size=512, wandb_mode="disabled")
    result = compare(str(held_out), tmp_path / "cmp", heads=str(tmp_path / "head"), resamples=300, wandb_mode="disabled")
    head = result["candidates"]["head"]
    assert head["kind"] == "head" and result["best_rule"] in result["candidates"]
    against = head["against_rules"]
    assert against["reduction_at_0.9"]["low"] > 0.25  # the signal no fixed rule reads
    assert against["never_worse_than_every_rule"] and against["within_intervals_of_every_rule"]
    oracle = result["candidates"]["oracle"]["rate_to_close"]["0.9"]["estimate"]
    assert oracle <= head["rate_to_close"]["0.9"]["estimate"] + 1e-9  # nothing beats the oracle
    for name in ("compare.json", "compare.csv", "summary.csv", "compare.png", "compare.md"):
        assert (tmp_path / "cmp" / name).exists(), name
    with (tmp_path / "cmp" / "summary.csv").open() as f:
        rows = {r["candidate"]: r for r in csv.DictReader(f)}
    assert float(rows["head"]["rate_0.9_low"]) <= float(rows["head"]["rate_0.9"]) <= float(rows["head"]["rate_0.9_high"])
    assert "fewer deferrals than" in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.fixture(scope="module")
def tiny_split_traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("split-traces")
    for split, limit in (("train", 16), ("test", 8)):
        log_traces(root / split, models="tiny-random", task="arithmetic", split=split, limit=limit, mode="reference", topk=0)
    return root


def test_compare_command_on_tiny_random(tiny_split_traces, tmp_path, capsys):
    root = tiny_split_traces
    train_deferral([str(root / "train")], tmp_path / "head", epochs=1, batch_size=256, wandb_mode="disabled")
    assert main(["compare", "--traces", str(root / "test"), "--heads", str(tmp_path / "head"), "--out", str(tmp_path / "cmp"),
                 "--resamples", "50", "--wandb-mode", "offline"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["examples"] == 8 and result["traces"]["split"] == "test"
    assert {"head", "oracle", "diff", "kl:tau=0.9", "js", "entropy", "tokenv3"} <= set(result["candidates"])
    assert list((tmp_path / "cmp" / "wandb").glob("offline-run-*"))  # the offline W&B run
    printed = capsys.readouterr().out.splitlines()
    assert "rate to close 90%" in printed[-6 - len(result["candidates"])]  # the table's header, its rows, then:
    verdicts = [line for line in printed[-5:-3] if line.startswith(("head:", "oracle:"))]  # the head's and the oracle's
    assert len(verdicts) == 2 and all("fewer deferrals than " + result["best_rule"] in line for line in verdicts)
    assert printed[-2] == (f"compare: 8 held-out examples, {result['rows']} positions; best rule (least deferral to close "
                           f"90% of the gap): {result['best_rule']}")
    assert printed[-1] == "compare: wrote " + ", ".join(str(tmp_path / "cmp" / name) for name in (
        "compare.md", "compare.png", "compare.json", "compare.csv", "summary.csv"))
    # a head judged on the traces it was trained on is refused, in one line
    assert main(["compare", "--traces", str(root / "train"), "--heads", str(tmp_path / "head"), "--out", str(tmp_path / "bad"),
                 "--wandb-mode", "disabled"]) == 2
    assert "judge it on traces it never saw" in capsys.readouterr().err


def test_compare_refuses_traces_without_losses(tmp_path, capsys):
    log_traces(tmp_path / "on-policy", models="tiny-random", task="arithmetic", limit=2, mode="on-policy", max_new_tokens=4, topk=0)
    assert main(["compare", "--traces", str(tmp_path / "on-policy"), "--out", str(tmp_path / "cmp"), "--wandb-mode", "disabled"]) == 2
    assert "reference traces" in capsys.readouterr().err


def test_the_text_and_markdown_tables_hold_the_same_rows_best_first():
    columns, ids = synthetic(40, seed=2)
    result = offline.compare_columns(columns, ids, "chow", resamples=20, scores={"head": -columns["q_top1"].numpy()})
    result["candidates"]["chow"]["rate_to_close"]["0.9"]["estimate"] = float("nan")  # undefined: last, shown as -
    text = comparison_text(result).splitlines()
    markdown = [line.strip("| ").split(" | ") for line in comparison_markdown(result, "c.png").splitlines()
                if line.startswith("| ")]
    assert markdown[0] == ["candidate", "kind", "rate to close 50%", "rate to close 75%", "rate to close 90%", "area"]
    assert [row[0] for row in markdown[1:]] == ["oracle", "head", "chow"]
    for line, row in zip(text[1:4], markdown[1:]):
        assert line.split()[0] == row[0] and " ".join(line.split()[1:]) == " ".join(row[2:])
    assert markdown[3][4] == "-" and text[0].split()[0] == "candidate"
