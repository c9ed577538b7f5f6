"""Bootstrap intervals over examples: coverage in simulation, resampling by example, pairing."""

from __future__ import annotations

import numpy as np
import pytest

from speccascade import uncertainty as U


def test_weights_draw_whole_examples():
    w = U.resample_weights(7, resamples=50, seed=3)
    assert w.shape == (50, 7) and np.all(w.sum(1) == 7) and np.all(w == np.round(w))
    assert np.array_equal(w, U.resample_weights(7, resamples=50, seed=3))


def test_mean_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    truth, hits, trials = 0.3, 0, 300
    for trial in range(trials):
        scores = rng.binomial(1, truth, size=80)
        hits += U.mean_interval(scores, weights=U.resample_weights(80, 400, seed=trial)).covers(truth)
    assert 0.90 <= hits / trials <= 0.99


def test_ratio_interval_resamples_examples_not_rows():
    # two examples: one holds 1,000 rows of loss 1, the other 1,000 rows of loss 0. Resampling rows
    # would give a near-zero-width interval around 0.5; resampling examples cannot tell 0 from 1.
    interval = U.ratio_interval(np.array([1000.0, 0.0]), np.array([1000.0, 1000.0]), U.resample_weights(2, 500))
    assert interval.estimate == pytest.approx(0.5)
    assert interval.low == 0.0 and interval.high == 1.0


def test_paired_difference_is_tighter_than_unpaired():
    rng = np.random.default_rng(1)
    base = rng.binomial(1, 0.5, size=200).astype(float)
    other = base.copy()
    other[:6] = 1 - other[:6]  # differs on 6 of 200 examples
    paired = U.paired_difference(other, base)
    unpaired_width = 2 * 1.96 * np.sqrt(2 * 0.25 / 200)
    assert paired.high - paired.low < unpaired_width / 3
    assert paired.covers(float(other.mean() - base.mean()))


def test_non_inferiority_by_margin():
    rng = np.random.default_rng(2)
    target = rng.binomial(1, 0.6, size=400).astype(float)
    same = target.copy()
    worse = np.where(rng.random(400) < 0.2, 0.0, target)  # loses a fifth of the solved examples
    assert U.non_inferior(same, target, margin=0.02)[0]
    ok, difference = U.non_inferior(worse, target, margin=0.02)
    assert not ok and difference.high < 0
    with pytest.raises(ValueError, match="same examples"):
        U.paired_difference(same[:10], target)


def test_interval_formats_with_its_bounds():
    assert f"{U.Interval(0.5, 0.4, 0.6):.2f}" == "0.50 [0.40, 0.60]"
