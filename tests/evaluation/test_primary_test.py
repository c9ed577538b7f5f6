"""Issue 24's primary test script (benchmarks/primary_test.py): a paired ratio of two points' target calls."""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from primary_test import best_non_inferior, paired_calls  # noqa: E402


def _records(directory: Path, name: str, ids: list[str], calls: list[int], score: list[float] | None = None) -> dict:
    score = score or [0.0] * len(ids)
    table = pa.table({"example_id": ids, "target_calls": calls, "drafter_calls": calls, "score": score})  # as evaluate's
    pq.write_table(table, directory / f"{name}.parquet")
    return {"records": f"{name}.parquet"}


def test_ratio_pairs_examples_by_id_whatever_their_order(tmp_path):
    head = _records(tmp_path, "head", ["a", "b", "c", "d"], [10, 20, 30, 40], [1, 1, 0, 1])
    rule = _records(tmp_path, "rule", ["d", "c", "b", "a"], [80, 60, 40, 20], [0, 0, 0, 1])  # twice the calls, other order
    out = paired_calls(tmp_path, head, rule)
    assert out["examples"] == 4 and out["ratio"] == pytest.approx(0.5)
    assert out["low"] == pytest.approx(0.5) and out["high"] == pytest.approx(0.5)  # every resample pairs them
    # scores paired by id: the head is right on b and d where the rule is not, so +0.5, and never below 0
    assert out["score_difference"]["estimate"] == pytest.approx(0.5) and out["score_difference"]["low"] >= 0


def test_points_on_different_examples_are_refused(tmp_path):
    head = _records(tmp_path, "head", ["a", "b"], [1, 2])
    rule = _records(tmp_path, "rule", ["a", "c"], [1, 2])
    with pytest.raises(SystemExit, match="different examples"):
        paired_calls(tmp_path, head, rule)


def test_the_denominator_is_the_non_inferior_candidate_with_the_fewest_calls():
    results = {"points": [
        {"label": "always", "non_inferior": True, "target_calls": 100},
        {"label": "gain:0.2", "non_inferior": False, "target_calls": 80},  # fewest calls, but loses quality
        {"label": "kl:0.6", "non_inferior": True, "target_calls": 95},
        {"label": "fly:1.1", "non_inferior": True, "target_calls": 97},
    ]}
    assert best_non_inferior(results, ["gain:0.2", "kl:0.6", "fly:1.1"], "always")["label"] == "kl:0.6"
    assert best_non_inferior(results, ["gain:0.2"], "always")["label"] == "always"  # none non-inferior
    assert best_non_inferior(results, ["gain:0.2"])["label"] == "gain:0.2"  # one label: that point, as before
    with pytest.raises(SystemExit, match="no single point"):
        best_non_inferior(results, ["kl:0.6", "entropy:0.9"], "always")
