"""Calibration of a head's deferral probability on held-out traces (scikit-learn), and its report:
AUROC, expected calibration error, Brier score and a reliability diagram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score

from ..report import pyplot, save_figure

METHODS = ("platt", "isotonic", "none")


def fit(method: str, logits: np.ndarray, targets: np.ndarray) -> dict:
    """Calibration parameters for raw logits -> P(deferring is right), as JSON for the head's config."""
    if method == "none" or len(np.unique(targets)) < 2:
        return {"method": "none"}
    if method == "platt":
        model = LogisticRegression().fit(logits.reshape(-1, 1), targets)
        return {"method": "platt", "a": float(model.coef_[0, 0]), "b": float(model.intercept_[0])}
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(logits, targets)
    return {"method": "isotonic", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 10) -> float:
    """Mean |frequency - confidence| over equal-width probability bins, weighted by bin size."""
    index = np.clip((probs * bins).astype(int), 0, bins - 1)
    return float(sum(abs(targets[index == b].mean() - probs[index == b].mean()) * (index == b).mean()
                     for b in range(bins) if (index == b).any()))


def auroc(targets: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(targets, scores)) if len(np.unique(targets)) == 2 else float("nan")


def report(probs: np.ndarray, targets: np.ndarray, logits: np.ndarray) -> dict:
    both = len(np.unique(targets)) == 2
    return {
        "auroc": auroc(targets, logits),
        "ece": expected_calibration_error(probs, targets),
        "brier": float(brier_score_loss(targets, probs)) if both else float("nan"),
    }


def reliability_diagram(probs: np.ndarray, targets: np.ndarray, path: Path, bins: int = 10) -> Path:
    """PNG: observed frequency of 'deferring was right' against predicted probability, per bin."""
    index = np.clip((probs * bins).astype(int), 0, bins - 1)
    used = [b for b in range(bins) if (index == b).any()]
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot([probs[index == b].mean() for b in used], [targets[index == b].mean() for b in used], "o-", label="head")
    ax.set_xlabel("predicted P(defer is right)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"reliability (ECE {expected_calibration_error(probs, targets, bins):.3f})")
    ax.legend()
    return save_figure(fig, path)
