"""``train-deferral``: fit a deferral head on traces, calibrate it, export a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score

from ..deferral import features as F
from ..deferral.heads import DeferralHead
from ..errors import SpeccascadeError
from .data import TraceDataModule
from .module import DeferralModule, defer_target

HEADS = {  # head name -> (kind, default features)
    "logistic": ("logistic", F.POSITION_FEATURES),
    "mlp": ("mlp", F.POSITION_FEATURES),
    "token-mlp": ("mlp", F.POSITION_FEATURES + F.TOKEN_FEATURES),
}
DEFERRAL_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by bin size."""
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(labels[index == b].mean() - probs[index == b].mean()) * (index == b).mean()
                     for b in range(bins) if (index == b).any()))


def train_deferral(
    traces: list[str],
    out: Path,
    head: str = "mlp",
    objective: str = "classification",
    features: list[str] | None = None,
    alpha: float = 0.0,
    hidden: int = 64,
    depth: int = 2,
    epochs: int = 10,
    batch_size: int = 4096,
    lr: float = 3e-3,
    val_fraction: float = 0.2,
    calibration: str = "platt",
    seed: int = 0,
) -> DeferralHead:
    """Train a deferral head on trace directories and export it (config.json + model.safetensors).

    Args:
        traces: trace directories written by log-traces.
        out: output directory of the head checkpoint.
        head: logistic, mlp or token-mlp (token-level, per candidate token).
        objective: gap (regression; a learned OPT), classification (cost-sensitive BCE on 1[gap > 0]) or relaxed.
        features: feature names (default: every position feature; token-mlp adds the token features).
        alpha: the relaxed objective's cost of deferring, per unit of D_TV.
        hidden: hidden width of the MLP.
        depth: hidden layers of the MLP.
        epochs: passes over the training rows.
        batch_size: rows per step.
        lr: AdamW learning rate.
        val_fraction: fraction of examples (not rows) held out for validation and calibration.
        calibration: platt (logistic on the validation logits) or none; gap heads are not calibrated.
        seed: seed of the split, the initialisation and the shuffling.
    """
    if head not in HEADS:
        raise SpeccascadeError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if calibration not in ("platt", "none"):
        raise SpeccascadeError(f"unknown calibration {calibration!r}; choose platt or none")
    kind, default_features = HEADS[head]
    features = list(features or default_features)
    pl.seed_everything(seed, workers=True, verbose=False)
    data = TraceDataModule([str(t) for t in traces], features, objective, val_fraction, batch_size, seed)
    data.setup()
    module = DeferralModule(features, data.mean, data.std, kind, hidden, depth, objective, alpha, lr)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, deterministic=True,
                         enable_model_summary=False, default_root_dir=str(out))
    trainer.fit(module, datamodule=data)

    trained = module.head.eval()
    scores, targets = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            scores.append(trained(batch["x"]))
            targets.append(defer_target(objective, batch["y"], alpha))
    score, target = torch.cat(scores).numpy(), torch.cat(targets).numpy()
    metrics = {"val_rows": int(len(score)), "train_rows": int(len(data.train_rows))}
    if len(np.unique(target)) == 2:
        metrics["auroc"] = float(roc_auc_score(target, score))
    if objective != "gap":
        if calibration == "platt" and len(np.unique(target)) == 2:
            platt = LogisticRegression().fit(score.reshape(-1, 1), target)
            trained.calibration = {"method": "platt", "a": float(platt.coef_[0, 0]), "b": float(platt.intercept_[0])}
        probs = trained.probability(torch.from_numpy(score)).numpy()
        metrics["ece"] = expected_calibration_error(probs, target)
        metrics["brier"] = float(brier_score_loss(target, probs)) if len(np.unique(target)) == 2 else float("nan")
        # threshold per target deferral rate: defer the most confident fraction
        trained.operating_points = {f"{r:g}": float(np.quantile(probs, 1 - r)) for r in DEFERRAL_RATES}
        trained.operating_points["default"] = 0.5
    else:
        trained.operating_points = {"default": 0.0}
    trained.metrics = metrics
    trained.provenance = {"traces": [{"path": str(t), "fingerprint": m.get("fingerprint"), "drafter": m.get("drafter"),
                                      "target": m.get("target"), "tokenizer": m.get("tokenizer")}
                                     for t, m in zip(traces, data.manifests)]}
    out = Path(out)
    trained.save(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return trained

