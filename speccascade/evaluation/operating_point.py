"""The operating-point picker: the knob of a rule that meets a deferral budget or a quality target,
read off validation traces (so a head can be deployed at a budget without decoding).

Every rule's deferral rate falls as its knob grows (for Chow, Diff, OPT, BiLD, TokenV1-3 and
learned heads, by their formulas), so the knob for a target rate is found by bisection. Quality
on traces is the mean loss of the emitted choice (``loss_p`` where deferred, ``loss_q`` else).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.traces import load_traces
from ..deferral import features as F
from ..deferral import rules as R
from ..errors import SpeccascadeError

BRACKETS = {"chow": (-0.01, 1.0), "diff": (-1.01, 1.0), "opt": (-1e3, 1e3), "bild": (-0.01, 1.0),
            "tokenv1": (-1.01, 1.0), "tokenv2": (-1.01, 1.0), "tokenv3": (-0.01, 1.0), "learned": (-1e3, 1e3)}


def _rule(spec: str, knob: float) -> R.Rule:
    if spec.startswith("learned:"):
        rule = R.Learned.from_pretrained(spec.split(":", 1)[1])
        return R.Learned(rule.head, knob, rule.alpha)
    return R.from_name(spec, knob)


def deferral_rate(spec: str, knob: float, columns: dict[str, torch.Tensor]) -> float:
    return float(_rule(spec, knob).decide(columns).float().mean())


def knob_for_rate(spec: str, columns: dict[str, torch.Tensor], rate: float, steps: int = 60) -> float:
    """The knob whose deferral rate on ``columns`` is closest to ``rate`` (bisection)."""
    if not 0.0 <= rate <= 1.0:
        raise SpeccascadeError(f"target deferral rate must be in [0, 1], got {rate}")
    name = "learned" if spec.startswith("learned:") else spec
    if name not in BRACKETS:
        raise SpeccascadeError(f"no operating-point picker for rule {spec!r}; choose one of {', '.join(BRACKETS)} or learned:DIR")
    low, high = BRACKETS[name]  # rate(low) is high, rate(high) is low
    for _ in range(steps):
        mid = (low + high) / 2
        if deferral_rate(spec, mid, columns) > rate:
            low = mid
        else:
            high = mid
    return min((low, high), key=lambda k: abs(deferral_rate(spec, k, columns) - rate))


def knob_for_loss(spec: str, columns: dict[str, torch.Tensor], max_loss: float, grid: int = 41) -> tuple[float, float]:
    """The least-deferring knob whose mean loss of the emitted choice is at most ``max_loss``; (knob, rate)."""
    for rate in np.linspace(0, 1, grid):
        knob = knob_for_rate(spec, columns, float(rate), steps=30)
        defer = _rule(spec, knob).decide(columns).numpy()
        if np.where(defer, columns["loss_p"].numpy(), columns["loss_q"].numpy()).mean() <= max_loss + 1e-12:
            return knob, float(defer.mean())
    raise SpeccascadeError(f"rule {spec!r} reaches no mean loss <= {max_loss} on these traces (deferring everything gives "
                           f"{float(columns['loss_p'].mean()):.4f})")


def operating_point(
    traces: str,
    rule: str,
    target_deferral_rate: float | None = None,
    target_loss: float | None = None,
) -> dict:
    """Pick a rule's knob on validation traces for a deferral budget or a quality (mean-loss) target.

    Args:
        traces: a trace directory (reference traces hold the loss columns the quality target needs).
        rule: a fixed rule name (chow, diff, opt, bild, tokenv1-3) or learned:DIR.
        target_deferral_rate: the fraction of drafted positions to defer.
        target_loss: the highest acceptable mean loss of the emitted choice (lower = better quality).
    """
    if (target_deferral_rate is None) == (target_loss is None):
        raise SpeccascadeError("give exactly one of --target-deferral-rate and --target-loss")
    table = load_traces(traces).with_format("torch")[:]
    columns = {c: v for c, v in table.items() if c in F.ALL_FEATURES + F.HIDDEN_INPUTS + ("loss_q", "loss_p")}
    if target_deferral_rate is not None:
        knob = knob_for_rate(rule, columns, target_deferral_rate)
        rate = deferral_rate(rule, knob, columns)
    else:
        if not {"loss_q", "loss_p"} <= set(columns):
            raise SpeccascadeError(f"traces in {traces} have no loss columns; log them with --mode reference")
        knob, rate = knob_for_loss(rule, columns, target_loss)
    result = {"rule": rule, "knob": knob, "deferral_rate": rate}
    print(f"{rule}: knob {knob:.6g} defers {rate:.3f} of positions on {Path(traces).name}")
    return result
