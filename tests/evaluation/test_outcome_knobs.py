"""The harm-budget knob picker of benchmarks/outcome_knobs.py (docs/plan-worked.md, amendment 1)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from outcome_knobs import most_accepting_cut, spelled  # noqa: E402

from speccascade.deferral import rules as R  # noqa: E402


def test_cut_accepts_the_most_mismatches_within_the_allowed_harm():
    score = np.array([0.1, 0.2, 0.2, 0.5, 0.7, 0.9, math.inf])
    harm = np.array([0, 0, 1, 0, 1, 0, 1])
    assert most_accepting_cut(score, harm, 0) == (pytest.approx(0.15), 1, 0)
    cut, accepted, harmful = most_accepting_cut(score, harm, 1)
    assert (accepted, harmful) == (4, 1) and cut == pytest.approx(0.6)  # the tie at 0.2 goes in whole
    cut, accepted, harmful = most_accepting_cut(score, harm, 5)
    assert (accepted, harmful) == (6, 2) and cut == 0.9  # +inf is never accepted: the last finite score
    assert (score <= cut).sum() == accepted  # the cut accepts exactly the counted rows


def test_no_cut_when_the_lowest_score_is_harmful():
    assert most_accepting_cut(np.array([0.3, 0.4]), np.array([1, 0]), 0) == (-math.inf, 0, 0)


def test_spelling_round_trips_through_the_rule_parser():
    kl = R.from_name("kl")
    spec = spelled("kl", kl, 0.123456789)
    assert R.parse(spec).build().cut == 0.123456789 and R.parse(spec).build().tau == kl.tau
    fly = R.from_name("fly")
    assert R.parse(spelled("fly", fly, -0.25)).build().theta == 0.25  # FLy's knob is minus its cut
    assert spelled("gain", R.from_name("gain"), -math.inf) is None
