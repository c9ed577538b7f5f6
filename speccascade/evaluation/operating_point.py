"""The operating-point picker: the knob of a rule that meets a deferral budget or a quality target,
read off validation traces (so a head can be deployed at a budget without decoding).

Every rule with a knob defers iff its score exceeds the knob, so the knob for a deferral rate is a
quantile of the score, and the knob for a quality target is read off the rule's curve
(:mod:`speccascade.evaluation.offline`). Quality on traces is the mean loss of the emitted choice
(``loss_p`` where deferred, ``loss_q`` else). A learned head is loaded once and scores every row once.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.traces import check_readable, load_traces, read_manifest, source
from ..deferral import features as F
from ..deferral import rules as R
from ..deferral.spec import TRACE_COLUMNS, check_head
from ..errors import SpeccascadeError
from ..report import say
from ..settings import resolve_groups, setting
from .offline import curve

PICKABLE = tuple(n for n, cls in R.FIXED_RULES.items() if cls.knob == "alpha" and cls is not R.LossySD) + ("learned:DIR",)


def _rule(spec: str) -> R.Rule:
    rule = R.parse(spec, setting="--rule").build()
    if not (isinstance(rule, R.Learned) or rule.name in PICKABLE):  # not topk (a whole k), lossy, fly (knob -cut)
        raise SpeccascadeError(f"no operating-point picker for rule {spec!r}; choose one of {', '.join(PICKABLE)}")
    return rule


def _scores(rule: R.Rule, columns: dict[str, torch.Tensor]) -> np.ndarray:
    score = rule.score(columns).double().numpy()
    return np.where(np.isnan(score), -np.inf, score)  # NaN never exceeds a knob


def knob_for_rate(rule: R.Rule, columns: dict[str, torch.Tensor], rate: float) -> float:
    """The knob that defers the fraction ``rate`` of the rows (as near as ties in the score allow)."""
    if not 0.0 <= rate <= 1.0:
        raise SpeccascadeError(f"target deferral rate must be in [0, 1], got {rate}")
    ordered = np.sort(_scores(rule, columns))[::-1]
    if rate >= 1.0:
        return -math.inf
    return float(ordered[min(math.ceil(rate * len(ordered)), len(ordered) - 1)])


def knob_for_loss(rule: R.Rule, columns: dict[str, torch.Tensor], max_loss: float) -> tuple[float, float]:
    """The least-deferring knob whose mean loss of the emitted choice is at most ``max_loss``; (knob, rate)."""
    loss_q, loss_p = columns["loss_q"].double().numpy(), columns["loss_p"].double().numpy()
    one = np.zeros(len(loss_q), dtype=int)  # every row in one group: plain means over rows
    c = curve(_scores(rule, columns), one, loss_q, loss_p, 1, np.linspace(0.0, 1.0, 1001))
    rates, losses = c.deferred[:, 0] / len(one), c.loss[:, 0] / len(one)
    reached = np.flatnonzero(losses <= max_loss + 1e-12)
    if not len(reached):
        raise SpeccascadeError(f"rule {rule.spec!r} reaches no mean loss <= {max_loss} on these traces (deferring "
                               f"everything gives {float(loss_p.mean()):.4f})")
    return float(c.knobs[reached[0]]), float(rates[reached[0]])


@dataclass(kw_only=True)
class OperatingPointSettings:
    """Settings of ``operating-point``."""

    traces: str = setting(help="a trace directory (reference traces hold the loss columns the quality target needs)")
    rule: str = setting(help="a rule whose knob is alpha (chow, diff, opt, bild, gain, kl, js, entropy, tokenv1-3) or learned:DIR")
    target_deferral_rate: float | None = setting(None, "the fraction of drafted positions to defer, in [0, 1]")
    target_loss: float | None = setting(None, "the highest acceptable mean loss of the emitted choice (lower = better quality)")

    def check_target(self) -> None:
        if (self.target_deferral_rate is None) == (self.target_loss is None):
            raise SpeccascadeError("give exactly one of --target-deferral-rate and --target-loss")
        if self.target_deferral_rate is not None and not 0.0 <= self.target_deferral_rate <= 1.0:
            raise SpeccascadeError(f"--target-deferral-rate must be in [0, 1], got {self.target_deferral_rate}")


@dataclass
class _Plan:
    settings: OperatingPointSettings
    rule: R.Rule


def operating_point(traces: str, rule: str, **options) -> dict:
    """Pick a rule's knob on validation traces for a deferral budget or a quality (mean-loss) target.

    ``options`` are the fields of :class:`OperatingPointSettings` (the command line's flags); returns the knob.
    """
    return run(resolve(OperatingPointSettings(traces=traces, rule=rule, **options)))


def resolve(settings: OperatingPointSettings) -> _Plan:
    """Check the settings, the rule (a learned head loads here, once) and the traces' manifest; read no rows."""
    s = resolve_groups(settings)
    s.check_target()
    chosen = _rule(s.rule)
    manifest = read_manifest(s.traces)
    check_readable(manifest, s.traces)
    if isinstance(chosen, R.Learned):
        check_head(chosen.head.provenance["path"], chosen.head.config(), source(s.traces, manifest))
    return _Plan(s, chosen)


def run(plan: _Plan) -> dict:
    """Score every row once and read the knob off the scores (or off the rule's loss curve)."""
    s, chosen = plan.settings, plan.rule
    table = load_traces(s.traces).with_format("torch")[:]
    wanted = (*F.ALL_FEATURES, *F.HIDDEN_INPUTS, *TRACE_COLUMNS.values(), "loss_q", "loss_p")
    columns = {c: v for c, v in table.items() if c in wanted}
    if s.target_deferral_rate is not None:
        knob = knob_for_rate(chosen, columns, s.target_deferral_rate)
    else:
        if not {"loss_q", "loss_p"} <= set(columns):
            raise SpeccascadeError(f"traces in {s.traces} have no loss columns; log them with --mode reference")
        knob, _ = knob_for_loss(chosen, columns, s.target_loss)
    rate = float((torch.from_numpy(_scores(chosen, columns)) > knob).double().mean())
    result = {"rule": s.rule, "knob": knob, "deferral_rate": rate}
    asked = f"deferral rate {s.target_deferral_rate:g}" if s.target_loss is None else f"mean loss <= {s.target_loss:g}"
    say("operating-point", f"{s.rule} (asked: {asked}): knob {knob:.6g} defers {rate:.3f} of the {len(table['example_id'])} "
        f"positions of {s.traces}", f"decode with {at_knob(chosen, knob).spec} (evaluate --rules, log-traces --rule); "
        "no file written")
    return result


def at_knob(rule: R.Rule, knob: float) -> R.Rule:
    """A copy of ``rule`` with its knob set to ``knob`` (its spec is what the decoding commands read)."""
    picked = copy.copy(rule)
    setattr(picked, rule.knob, knob)
    return picked
