"""Offline comparison on validation traces: quality proxy against deferral rate, per rule.

Cheap because every fixed rule is a function of the logged features (``Rule.decide`` over trace
columns). The quality proxy of a decision is the mean loss of the emitted choice: ``loss_p``
where the rule defers, ``loss_q`` where it keeps the draft (reference traces). Token rules are
judged at the logged draft token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..deferral import rules

GRIDS: dict[str, np.ndarray] = {
    "chow": np.linspace(-0.05, 1.0, 22),
    "diff": np.linspace(-1.05, 1.0, 42),
    "opt": np.concatenate([[-np.inf], np.linspace(-5, 5, 41), [np.inf]]),
    "tokenv1": np.linspace(-1.05, 1.0, 42),
    "tokenv2": np.linspace(-1.05, 1.0, 42),
    "tokenv3": np.linspace(-0.05, 1.0, 22),
}


def _point(defer: np.ndarray, loss_q: np.ndarray, loss_p: np.ndarray) -> tuple[float, float]:
    return float(defer.mean()), float(np.where(defer, loss_p, loss_q).mean())


def curves(columns: dict[str, np.ndarray], learned: rules.Learned | None = None, steps: int = 21) -> list[dict]:
    """Points (rule, knob, deferral_rate, loss) for every fixed rule's grid and the learned head."""
    tensors = {k: torch.as_tensor(v) for k, v in columns.items() if np.issubdtype(np.asarray(v).dtype, np.number)}
    loss_q, loss_p = columns["loss_q"], columns["loss_p"]
    points = []
    for name, grid in GRIDS.items():
        rule_cls = rules.FIXED_RULES[name]
        if not set(rule_cls.features) <= set(tensors):
            continue
        for alpha in grid:
            defer = rule_cls(alpha=float(alpha)).decide(tensors).numpy()
            rate, loss = _point(defer, loss_q, loss_p)
            points.append({"rule": name, "knob": float(alpha), "deferral_rate": rate, "loss": loss})
    if learned is not None:
        value = learned.value(tensors)
        for threshold in np.quantile(value.numpy(), np.linspace(0, 1, steps)):
            defer = (value > threshold).numpy()
            rate, loss = _point(defer, loss_q, loss_p)
            points.append({"rule": "learned", "knob": float(threshold), "deferral_rate": rate, "loss": loss})
    return points


def area(points: list[dict], rule: str, keep_all_loss: float) -> float:
    """Mean over deferral budgets r in [0, 1] of the best loss the rule reaches deferring at most r
    (lower is better); with no point within a budget, the loss of never deferring."""
    pts = [(p["deferral_rate"], p["loss"]) for p in points if p["rule"] == rule]
    budgets = np.linspace(0, 1, 101)
    return float(np.mean([min([loss for rate, loss in pts if rate <= r + 1e-9], default=keep_all_loss) for r in budgets]))


def plot(points: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rule in dict.fromkeys(p["rule"] for p in points):
        pts = sorted((p["deferral_rate"], p["loss"]) for p in points if p["rule"] == rule)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-" if rule != "learned" else "o-", label=rule,
                linewidth=2.5 if rule == "learned" else 1.2)
    ax.set_xlabel("deferral rate")
    ax.set_ylabel("mean loss of the emitted choice (lower is better)")
    ax.set_title("offline comparison on validation traces")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
