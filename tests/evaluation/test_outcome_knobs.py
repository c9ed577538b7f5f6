"""The harm-budget knob picker of benchmarks/outcome_knobs.py (docs/plan-worked.md, amendment 1)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from outcome_knobs import (acceptance_cut, accepted_replicates, first_harmful, harm_at_acceptance, most_accepting_cut,  # noqa: E402
                           spelled, swapped)

from speccascade.deferral import rules as R  # noqa: E402
from speccascade.uncertainty import percentile_interval, resample_weights  # noqa: E402


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


def test_weights_count_rows_as_a_resample_draws_their_problems():
    score = np.array([0.1, 0.2, 0.3, 0.4])
    harm = np.array([0, 1, 0, 0])
    assert most_accepting_cut(score, harm, 0, np.ones(4)) == most_accepting_cut(score, harm, 0)
    assert most_accepting_cut(score, harm, 0, np.array([2.0, 0.0, 1.0, 3.0]))[1:] == (6, 0)  # the harmful row not drawn
    assert most_accepting_cut(score, harm, 1, np.array([1.0, 2.0, 1.0, 1.0]))[1:] == (1, 0)  # drawn twice: over budget


def test_the_paired_interval_tells_a_score_that_ranks_harm_last_from_one_that_does_not():
    """Mismatches of 60 problems, a third harmful: a score that puts every harmful one last accepts all the others
    within the budget, a random one few; the paired interval of the difference excludes 0 and holds the estimate."""
    rng = np.random.default_rng(0)
    example = np.repeat(np.arange(60), 5)
    harm = (rng.random(len(example)) < 1 / 3).astype(int)
    ranked, random = harm + rng.random(len(harm)) * 0.5, rng.random(len(harm))
    weights = resample_weights(60, resamples=200, seed=0)[:, example]
    good, bad = (accepted_replicates(s, harm, 1, weights) for s in (ranked, random))
    estimate = most_accepting_cut(ranked, harm, 1)[1] - most_accepting_cut(random, harm, 1)[1]
    interval = percentile_interval(estimate, good - bad)
    assert estimate == (harm == 0).sum() + 1 - most_accepting_cut(random, harm, 1)[1] > 0  # and one harmful
    assert 0 < interval.low <= estimate <= interval.high


def test_harm_at_equal_acceptance_counts_the_harm_among_the_lowest_scores():
    score = np.array([0.1, 0.2, 0.2, 0.5, 0.7, math.inf])
    harm = np.array([0, 1, 0, 0, 1, 1])
    once = harm_at_acceptance(score, harm, [1, 2, 4, 5, 6], np.ones((1, 6)))
    # 2 lowest: the tie at 0.2 goes in whole (3 accepted, 1 harmful); +inf is never accepted
    assert once[0, :4].tolist() == [0, 1, 1, 2] and np.isnan(once[0, 4])
    drawn = harm_at_acceptance(score, harm, [2, 4], np.array([[3.0, 0.0, 1.0, 1.0, 1.0, 1.0]]))
    assert drawn.tolist() == [[0, 0]]  # the first row drawn thrice fills the count; the harmful 0.2 was not drawn
    assert first_harmful(score, harm, 2) == [(1, 1), (4, 4)]  # (rank, index), lowest score first
    # the cut at each count accepts exactly the rows counted there: 1, the tie (3), 4, 5; none for 6
    assert [(score <= acceptance_cut(score, n)).sum() for n in (1, 2, 4, 5)] == [1, 3, 4, 5]
    assert acceptance_cut(score, 6) == -math.inf


def test_equal_acceptance_tells_a_score_that_ranks_harm_last_from_one_that_does_not():
    """The same planted problems as above: at equal acceptance the ranking score lets through no harm until the
    harmless mismatches run out, a random one about a third; the paired interval excludes 0."""
    rng = np.random.default_rng(1)
    example = np.repeat(np.arange(60), 5)
    harm = (rng.random(len(example)) < 1 / 3).astype(int)
    ranked, random = harm + rng.random(len(harm)) * 0.5, rng.random(len(harm))
    weights = np.vstack([np.ones(len(harm)), resample_weights(60, resamples=200, seed=0)[:, example]])
    good, bad = (harm_at_acceptance(s, harm, [100], weights)[:, 0] for s in (ranked, random))
    assert good[0] == 0 and bad[0] > 15
    interval = percentile_interval(good[0] - bad[0], good[1:] - bad[1:])
    assert interval.high < 0


def test_the_first_harmful_mismatches_are_shown_as_text_with_their_kind():
    from datasets import Dataset

    from speccascade.decoding.presets import byte_tokenizer

    tokenizer = byte_tokenizer()
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    rows = Dataset.from_dict({"example_id": ["a", "a", "b"], "position": [3, 7, 2],
                              "draft_token": [ids("x")[0], ids("7")[0], ids("w")[0]],
                              "target_argmax": [ids("y")[0], ids("9")[0], ids("v")[0]]})
    keep = np.array([1, 2])  # the mismatches are rows 1 and 2
    found = swapped(rows, keep, [(0, 1), (5, 0)], tokenizer)
    assert found == [{"rank": 0, "example_id": "b", "position": 2, "draft": "w", "target": "v", "kind": "other"},
                     {"rank": 5, "example_id": "a", "position": 7, "draft": "7", "target": "9", "kind": "digit"}]
