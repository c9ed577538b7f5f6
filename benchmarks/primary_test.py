"""Issue 24's primary test (docs/plan-worked.md): one point's target calls over another's, paired, from an
``evaluate`` directory.

Both points were decoded on the same examples by one ``evaluate`` run; this reads their per-example
records and gives the ratio of their sums of target calls with its 95% bootstrap interval over examples
(1,000 resamples, seed 0), the paired difference of their scores (the first point's minus the second's), and
each point's non-inferiority to the target as ``evaluate`` judged it.

    python benchmarks/primary_test.py runs/eval/worked-test "learned:outcome-mlp@0.31" "gain:0.15"

With several denominator labels (comma-separated) the denominator is the one with the fewest target calls among
those ``evaluate`` judged non-inferior to the target, or ``--otherwise``'s point where none is (the plan's
amendment 8: the best training-free rule at non-inferior quality, else exact decoding):

    python benchmarks/primary_test.py runs/eval/worked-test "learned:outcome-mlp@0.31" "gain:0.15,kl:0.6:tau=0.9" \
        --otherwise "speculative decoding"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq

from speccascade.evaluation.points import calls_against
from speccascade.uncertainty import paired_difference, resample_weights


def point(results: dict, label: str) -> dict:
    """The point of ``results.json`` with this label (the rule's spelling as the report shows it)."""
    found = [p for p in results["points"] if p["label"] == label]
    if len(found) != 1:
        raise SystemExit(f"error: no single point labelled {label!r}; labels: {', '.join(p['label'] for p in results['points'])}")
    return found[0]


def best_non_inferior(results: dict, candidates: list[str], otherwise: str | None = None) -> dict:
    """Of the candidates' points, the non-inferior one with the fewest target calls; where none is non-inferior,
    ``otherwise``'s point (the first candidate's without it)."""
    points = [point(results, label) for label in candidates]
    kept = [p for p in points if p["non_inferior"]]
    if kept:
        return min(kept, key=lambda p: p["target_calls"])
    return point(results, otherwise) if otherwise else points[0]


def paired_calls(directory: Path, numerator: dict, denominator: dict, seed: int = 0) -> dict:
    """The ratio of the two points' target calls, summed over the examples both decoded, with its interval; and the
    difference of their scores (numerator - denominator), paired on the same resamples."""
    a, b = (pq.read_table(directory / p["records"]).to_pandas().set_index("example_id") for p in (numerator, denominator))
    if set(a.index) != set(b.index):
        raise SystemExit("error: the two points were decoded on different examples")
    b = b.loc[a.index]
    weights = resample_weights(len(a), seed=seed)
    calls = calls_against(a, b, weights)  # evaluate's own paired ratio, against b here
    difference = paired_difference(a["score"], b["score"], weights)
    return {"examples": len(a), "ratio": calls["target_calls_vs_exact"], "low": calls["target_calls_vs_exact_low"],
            "high": calls["target_calls_vs_exact_high"], "score_difference": difference.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation", type=Path, help="an evaluate output directory")
    parser.add_argument("numerator", help="the label of the learned head's point")
    parser.add_argument("denominator", help="the label of the best training-free rule's point, or several labels "
                        "(comma-separated): the non-inferior one with the fewest target calls")
    parser.add_argument("--otherwise", help="the label of the denominator where no candidate is non-inferior")
    args = parser.parse_args()
    results = json.loads((args.evaluation / "results.json").read_text())
    a, b = point(results, args.numerator), best_non_inferior(results, args.denominator.split(","), args.otherwise)
    report = {"denominator": b["label"]} | paired_calls(args.evaluation, a, b)
    both = bool(a["non_inferior"] and b["non_inferior"])
    report |= {"non_inferior": {args.numerator: a["non_inferior"], b["label"]: b["non_inferior"]},
               "goal_met": bool(report["ratio"] <= 0.85 and report["high"] < 1.0 and both)}  # the plan's primary goal
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
