"""Uncertainty of every quality claim: 95% percentile-bootstrap intervals that resample *examples*.

Rows of one example (the positions of one reply) are not independent, so a statistic over rows
is resampled by drawing whole examples with replacement: each resample is a vector of counts,
how often each example was drawn (``resample_weights``), and a statistic that is a ratio of
per-example sums (a mean over rows, a rate over positions) is recomputed from those counts
without copying any data. Paired statistics (a rule against the target on the same examples)
draw both sides with the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000


@dataclass(frozen=True)
class Interval:
    """An estimate on all examples and its bootstrap interval."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def resample_weights(n_examples: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, n_examples]`` counts: how often each example is drawn in each bootstrap resample."""
    if n_examples < 1:
        raise ValueError("the bootstrap needs at least one example")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_examples, np.full(n_examples, 1.0 / n_examples), size=resamples).astype(np.float64)


def percentile_interval(estimate: float, replicates: np.ndarray, level: float = LEVEL) -> Interval:
    """The central ``level`` interval of bootstrap replicates (NaN replicates are ignored)."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return Interval(float(estimate), float("nan"), float("nan"))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def ratio(numerators: np.ndarray, denominators: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """``sum(w * num) / sum(w * den)`` over examples: on all examples, or per resample for ``weights`` ``[R, n]``."""
    if weights is None:
        return float(np.sum(numerators) / np.sum(denominators))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ numerators) / (weights @ denominators)


def ratio_interval(numerators: np.ndarray, denominators: np.ndarray, weights: np.ndarray, level: float = LEVEL) -> Interval:
    """A rate over rows grouped by example (per-example sums of the rows' values and row counts)."""
    numerators, denominators = np.asarray(numerators, float), np.asarray(denominators, float)
    return percentile_interval(ratio(numerators, denominators), ratio(numerators, denominators, weights), level)


def mean_interval(values: np.ndarray, weights: np.ndarray | None = None, level: float = LEVEL, seed: int = 0) -> Interval:
    """The mean of one value per example (a score, a length), with its interval."""
    values = np.asarray(values, dtype=float)
    weights = resample_weights(len(values), seed=seed) if weights is None else weights
    return ratio_interval(values, np.ones_like(values), weights, level)


def paired_difference(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None, level: float = LEVEL,
                      seed: int = 0) -> Interval:
    """``mean(a) - mean(b)`` over the same examples, both sides resampled together."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same examples: {a.shape} against {b.shape}")
    return mean_interval(a - b, weights, level, seed)


def non_inferior(a: np.ndarray, b: np.ndarray, margin: float, weights: np.ndarray | None = None,
                 level: float = LEVEL, seed: int = 0) -> tuple[bool, Interval]:
    """Whether ``a`` is no worse than ``b`` by more than ``margin``: the interval of the paired
    difference ``mean(a) - mean(b)`` lies above ``-margin`` (a one-sided test at (1 - level) / 2)."""
    difference = paired_difference(a, b, weights, level, seed)
    return bool(difference.low >= -margin), difference
