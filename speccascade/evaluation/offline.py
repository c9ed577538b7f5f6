"""Offline comparison of deferral rules and learned heads on reference traces, with 95% intervals.

Quality of a decision is the loss of the emitted choice: ``loss_p`` where the rule defers,
``loss_q`` where it keeps the draft (teacher-forced, against the gold token). Every rule with a
knob defers iff ``score > knob`` (:mod:`speccascade.deferral.rules`), so its whole curve comes from
one pass over its scores: the knob that defers a fraction ``rho`` of all positions is a quantile
of the score. Token rules are judged at the logged draft token; the *oracle* defers where the
true gap ``loss_q - loss_p`` is largest, the bound no rule can beat.

Every number comes with a bootstrap interval that resamples *examples*: a curve point is a ratio
of per-example sums, recomputed for each resample's example counts
(:mod:`speccascade.uncertainty`). Rates and losses of one resample are read off the
same drawn examples for every candidate, so differences between candidates are paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..deferral import rules as R
from ..errors import SpeccascadeError
from ..listing import split_list
from ..uncertainty import LEVEL, Interval, percentile_interval, ratio, resample_weights

QUANTILES = np.linspace(0.0, 1.0, 201)  # knobs at these deferral rates of all positions
RATES = np.linspace(0.0, 1.0, 101)  # where budget curves are read: best loss deferring at most rho
GAP_FRACTIONS = (0.5, 0.75, 0.9)  # report the deferral rate that closes these fractions of the gap
BAND = (0.05, 0.95)  # heads are compared with rules at every rate of RATES within this band
DEFAULT_RULES = ("chow,diff,opt,bild,gain,kl:tau=0.5,kl:tau=0.8,kl:tau=0.9,kl:tau=0.95,kl:tau=1,js,entropy,"
                 "tokenv1,tokenv2,tokenv3,topk")
LOSS_COLUMNS = ("loss_q", "loss_p")


@dataclass
class Candidate:
    """A family of deferral decisions over one score (a rule or head with its knob free)."""

    label: str
    kind: str  # "rule", "head" or "oracle"
    score: np.ndarray  # [N] per row; NaN never defers
    knob_of: Callable[[float], float] | None = None  # a rule's knob at a cut of its score (None: the cut itself)


@dataclass
class Curve:
    """A candidate's points at ``len(knobs)`` knobs: per-example deferral counts and emitted-loss sums."""

    knobs: np.ndarray  # [K], decreasing: rates grow along the curve
    deferred: np.ndarray  # [K, E]
    loss: np.ndarray  # [K, E]


def candidates(columns: dict[str, torch.Tensor], rules: str | list[str] = DEFAULT_RULES,
               heads: dict[str, R.Learned] | None = None, oracle: bool = True,
               scores: dict[str, np.ndarray] | None = None) -> list[Candidate]:
    """Scores of each rule family (``kl:tau=0.9``: the knob is swept), each head, each precomputed
    score (a model outside the package, judged like a head) and the oracle."""
    specs = split_list(rules, "--rules")
    out = []
    for spec in specs:
        rule = R.parse(spec).build()
        if rule.knob is None or isinstance(rule, R.LossySD):
            continue  # always / never are the curves' end points; lossy SD is no deferral rule
        out.append(Candidate(_family(rule), "rule", _numpy(rule.score(columns)), rule.knob_of))
    for label, head in (heads or {}).items():
        out.append(Candidate(label, "head", _numpy(head.score(columns))))
    for label, score in (scores or {}).items():
        out.append(Candidate(label, "head", np.asarray(score, dtype=np.float64)))
    if oracle:
        out.append(Candidate("oracle", "oracle", (columns["loss_q"] - columns["loss_p"]).double().numpy()))
    return out


def available(rules: str | list[str], columns: set[str] | list[str]) -> list[str]:
    """The rule specs whose columns are all among ``columns``."""
    specs = split_list(rules, "--rules")
    return [s for s in specs if set(R.parse(s).build().columns) <= set(columns)]


def _family(rule: R.Rule) -> str:
    """``kl:tau=0.9``: a rule's name and settings, without the knob."""
    return rule.name + rule.settings_spec


def _numpy(score: torch.Tensor) -> np.ndarray:
    return score.detach().double().cpu().numpy()


def curve(score: np.ndarray, example: np.ndarray, loss_q: np.ndarray, loss_p: np.ndarray, n_examples: int,
          quantiles: np.ndarray = QUANTILES) -> Curve:
    """The candidate at knobs placed at ``quantiles`` of its scores (deferral rates of all rows).

    A row is deferred at every knob below its score, so each row enters the curve once: per-example
    sums are one ``bincount`` over (entry point, example), then a cumulative sum over knobs. A score of
    ``+inf`` defers at every knob (FLy's rows that no theta keeps): the knobs lie among the other scores,
    so such a curve starts at the least deferral its knob reaches, not at a rate no knob gives.
    """
    finite = np.where(np.isnan(score), -np.inf, score)  # NaN never exceeds a knob
    ordered = np.sort(finite[finite < np.inf])[::-1] if (finite < np.inf).any() else np.array([-np.inf])
    cut = np.minimum(np.ceil(quantiles * len(ordered)).astype(int), len(ordered) - 1)
    knobs = np.where(quantiles >= 1.0, -np.inf, ordered[cut])  # quantile 0 keeps every draft (but +inf's), 1 defers all
    # a row's entry point: the first knob it exceeds (knobs decrease), len(knobs) if none
    entry = np.searchsorted(-knobs, -finite, side="right")
    grid = (len(knobs) + 1, n_examples)
    flat = entry * n_examples + example
    deferred = np.bincount(flat, minlength=grid[0] * grid[1]).reshape(grid).cumsum(0)[:-1]
    gain = np.bincount(flat, weights=loss_p - loss_q, minlength=grid[0] * grid[1]).reshape(grid).cumsum(0)[:-1]
    keep_all = np.bincount(example, weights=loss_q, minlength=n_examples)
    return Curve(knobs, deferred.astype(float), keep_all[None, :] + gain)


@dataclass
class Judged:
    """A candidate's curve read on all examples (``estimate``) and on each bootstrap resample."""

    candidate: Candidate
    curve: Curve
    rates: np.ndarray  # [K] on all examples
    losses: np.ndarray  # [K]
    budget: np.ndarray  # [len(RATES)] best loss within each deferral budget, all examples
    budget_resampled: np.ndarray  # [R, len(RATES)]
    to_close: dict[float, np.ndarray]  # fraction -> [1 + R] rate that closes it (all examples first)
    area: np.ndarray  # [1 + R]


def judge(cand: Candidate, example: np.ndarray, loss_q: np.ndarray, loss_p: np.ndarray, weights: np.ndarray) -> Judged:
    """Curve, budget curve, rates that close each gap fraction and area, on all examples and per resample."""
    n_examples = weights.shape[1]
    c = curve(cand.score, example, loss_q, loss_p, n_examples)
    rows = np.bincount(example, minlength=n_examples).astype(float)
    all_w = np.vstack([np.ones((1, n_examples)), weights])  # row 0: every example once
    rates = (all_w @ c.deferred.T) / (all_w @ rows)[:, None]  # [1 + R, K]
    losses = (all_w @ c.loss.T) / (all_w @ rows)[:, None]
    keep_all = (all_w @ np.bincount(example, weights=loss_q, minlength=n_examples)) / (all_w @ rows)
    defer_all = (all_w @ np.bincount(example, weights=loss_p, minlength=n_examples)) / (all_w @ rows)
    # rates grow along the curve: best loss so far, deferring nothing (the drafter's loss) among the choices, as it
    # is every curve's first point but one that starts above it (FLy's), which has no point within the least budgets
    best = np.minimum(np.minimum.accumulate(losses, axis=1), keep_all[:, None])
    within = (rates[:, :, None] <= RATES[None, None, :] + 1e-12).sum(1) - 1  # last point within budget
    budget = np.where(within >= 0, np.take_along_axis(best, np.maximum(within, 0), axis=1), keep_all[:, None])
    to_close = {}
    for fraction in GAP_FRACTIONS:
        goal = keep_all - fraction * (keep_all - defer_all)
        reached = losses <= goal[:, None] + 1e-12
        first = np.where(reached.any(1), reached.argmax(1), -1)
        to_close[fraction] = np.where(first >= 0, rates[np.arange(len(rates)), np.maximum(first, 0)], np.nan)
    return Judged(cand, c, rates[0], losses[0], budget[0], budget[1:], to_close, budget.mean(1))


def compare_columns(columns: dict[str, torch.Tensor], example_ids: np.ndarray, rules: str | list[str] = DEFAULT_RULES,
                    heads: dict[str, R.Learned] | None = None, resamples: int = 1000, seed: int = 0,
                    level: float = LEVEL, oracle: bool = True, scores: dict[str, np.ndarray] | None = None) -> dict:
    """Judge every rule family, head and the oracle on trace ``columns`` (one row per position).

    Returns a JSON-ready dict: per candidate its curve (knob, rate, loss), its budget curve with
    intervals, the rates that close 50/75/90% of the drafter->target gap and the area (mean best
    loss over budgets), each with an interval; per head, the reduction in deferrals against the best
    rule and the paired difference to every rule along the budget curve.
    """
    missing = [c for c in LOSS_COLUMNS if c not in columns]
    if missing:
        raise SpeccascadeError(f"the comparison needs reference traces (columns {', '.join(missing)} are missing)")
    _, example = np.unique(example_ids, return_inverse=True)
    n_examples = int(example.max()) + 1
    weights = resample_weights(n_examples, resamples, seed)
    loss_q, loss_p = (columns[c].double().numpy() for c in LOSS_COLUMNS)
    judged = [judge(c, example, loss_q, loss_p, weights) for c in candidates(columns, rules, heads, oracle, scores)]
    rows = np.bincount(example, minlength=n_examples).astype(float)
    sums = {name: _sums(example, values, n_examples) for name, values in
            (("keep_all", loss_q), ("defer_all", loss_p), ("gap", loss_q - loss_p))}
    result = {
        "examples": n_examples, "rows": int(len(example)), "resamples": resamples, "level": level, "seed": seed,
        **{f"loss_{name}": percentile_interval(ratio(sums[name], rows), ratio(sums[name], rows, weights), level).as_dict()
           for name in ("keep_all", "defer_all")},
        "gap": percentile_interval(ratio(sums["gap"], rows), ratio(sums["gap"], rows, weights), level).as_dict(),
        "rates": RATES.tolist(),
        "candidates": {j.candidate.label: _summary(j, level) for j in judged},
    }
    rule_judged = [j for j in judged if j.candidate.kind == "rule"]
    if rule_judged:
        best = min(rule_judged, key=lambda j: _nan_last(j.to_close[0.9][0]))
        result["best_rule"] = best.candidate.label
        for j in judged:
            if j.candidate.kind != "rule":
                result["candidates"][j.candidate.label]["against_rules"] = _against(j, best, rule_judged, level)
    return result


def _sums(example: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(example, weights=values, minlength=n)


def _nan_last(value: float) -> float:
    return np.inf if np.isnan(value) else value


def _summary(j: Judged, level: float) -> dict:
    lows, highs = (np.nanpercentile(j.budget_resampled, q, axis=0) for q in ((1 - level) / 2 * 100, (1 + level) / 2 * 100))
    return {
        "kind": j.candidate.kind,
        "rate_to_close": {f"{f:g}": percentile_interval(v[0], v[1:], level).as_dict() for f, v in j.to_close.items()},
        "area": percentile_interval(j.area[0], j.area[1:], level).as_dict(),
        "points": [{"knob": float(j.candidate.knob_of(k) if j.candidate.knob_of else k), "deferral_rate": float(r),
                    "loss": float(l)} for k, r, l in zip(j.curve.knobs, j.rates, j.losses)],
        "budget": {"loss": j.budget.tolist(), "low": lows.tolist(), "high": highs.tolist()},
    }


def _against(head: Judged, best: Judged, rules: list[Judged], level: float) -> dict:
    """Deferral-rate reduction against the best rule at 90% of the gap; paired budget-curve differences."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_all = 1 - head.to_close[0.9] / best.to_close[0.9]
    inside = (RATES >= BAND[0] - 1e-12) & (RATES <= BAND[1] + 1e-12)
    per_rule = {}
    for rule in rules:
        diff = head.budget_resampled[:, inside] - rule.budget_resampled[:, inside]  # < 0: the head is better
        low, high = (np.nanpercentile(diff, q, axis=0) for q in ((1 - level) / 2 * 100, (1 + level) / 2 * 100))
        rule_high = np.nanpercentile(rule.budget_resampled[:, inside], (1 + level) / 2 * 100, axis=0)
        per_rule[rule.candidate.label] = {
            "within_intervals": bool(np.all(head.budget[inside] <= rule_high)),  # never above the rule's band
            "never_worse": bool(np.all(low <= 0)),  # paired: nowhere significantly above the rule
            "better_everywhere": bool(np.all(high < 0)),  # paired: significantly below the rule at every rate
            "largest_difference": float(np.max(head.budget[inside] - rule.budget[inside])),
        }
    return {
        "best_rule": best.candidate.label,
        "reduction_at_0.9": percentile_interval(ratio_all[0], ratio_all[1:], level).as_dict(),
        "within_intervals_of_every_rule": all(v["within_intervals"] for v in per_rule.values()),
        "never_worse_than_every_rule": all(v["never_worse"] for v in per_rule.values()),
        "rules": per_rule,
    }


def interval(d: dict) -> Interval:
    """An :class:`Interval` back from its JSON form."""
    return Interval(d["estimate"], d["low"], d["high"])
