"""Issue 24's choices from the validation labels (benchmarks/worked_choice.py): knobs, the best training-free
rule, the head, and the test's rule lists, with their tie rules."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from worked_choice import choose  # noqa: E402

HEADS = ("learned:h/mlp", "learned:h/hidden-mlp")


def _report(accepted: dict[str, int], specs: dict[str, str | None] | None = None) -> dict:
    """An outcome_knobs.py report: each rule's spelling and count at the budget, and its cut at 800 accepted."""
    specs = specs or {}
    return {"rules": {name: {"1": {"spec": specs.get(name, f"{name}@{n}"), "accepted": n},
                             "at_accepted": {"800": {"spec": f"{name}@800"}}} for name, n in accepted.items()}}


def _curve(aurocs: dict[str, float]) -> dict:
    return {name: {"estimate": value, "low": value - 0.03, "high": value + 0.03} for name, value in aurocs.items()}


def test_the_most_accepting_rule_and_head_go_to_the_test():
    knobs = _report({"gain": 80, "kl": 93, "entropy": 30, "fly": 20, "diff": 50, "tokenv3": 70,
                     HEADS[0]: 40, HEADS[1]: 89}, {"fly": None})
    out = choose(knobs, _curve({HEADS[0]: 0.9, HEADS[1]: 0.8}))
    assert out["best_training_free"] == {"name": "kl", "spec": "kl@93"}  # TokenV3 is the paper's, not a candidate
    assert out["head"] == {"name": HEADS[1], "spec": f"{HEADS[1]}@89"}  # more accepted beats a higher AUROC
    assert out["rules"]["fly"] == "always"  # no cut within the budget: exact decoding's place
    assert out["test_rules"] == (f"target,drafter,always,gain@80,kl@93,entropy@30,always,diff@50,tokenv3@70,{HEADS[1]}@89")
    assert out["secondary_rules"] == f"target,{HEADS[1]}@800,kl@800"


def test_ties_go_to_the_rule_named_first_and_the_head_with_the_higher_auroc():
    knobs = _report({"gain": 60, "kl": 60, "entropy": 60, "fly": 60, "diff": 0, "tokenv3": 0, HEADS[0]: 9, HEADS[1]: 9})
    out = choose(knobs, _curve({HEADS[0]: 0.77, HEADS[1]: 0.87}))
    assert out["best_training_free"]["name"] == "gain" and out["head"]["name"] == HEADS[1]
    out = choose(knobs, _curve({HEADS[0]: 0.91, HEADS[1]: 0.87}))
    assert out["head"]["name"] == HEADS[0]


def test_a_report_without_a_rule_or_a_head_or_the_equal_acceptance_cut_is_refused():
    full = {"gain": 1, "kl": 1, "entropy": 1, "fly": 1, "diff": 1, "tokenv3": 1}
    with pytest.raises(SystemExit, match="lacks fly"):
        choose(_report({k: v for k, v in full.items() if k != "fly"} | {HEADS[0]: 1}), _curve({HEADS[0]: 0.8}))
    with pytest.raises(SystemExit, match="lacks any learned: head"):
        choose(_report(full), {})
    short = _report(full | {HEADS[0]: 5})
    short["rules"][HEADS[0]]["at_accepted"]["800"]["spec"] = None
    with pytest.raises(SystemExit, match="h/mlp scores fewer than 800 validation mismatches finite"):
        choose(short, _curve({HEADS[0]: 0.8}))
