"""``train-deferral``: fit a deferral head on traces, calibrate it, compare it offline with the
fixed rules, export a checkpoint, and log all of it locally and to W&B (offline by default)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from ..deferral import features as F
from ..deferral import rules
from ..deferral.heads import HIDDEN_INPUTS, DeferralHead
from ..errors import SpeccascadeError
from ..evaluation import offline
from ..evaluation.compare import log_to_wandb as log_comparison
from ..evaluation.compare import write as write_comparison
from ..tracking import resolve_wandb_mode
from . import calibration as cal
from .data import TraceDataModule
from .module import DeferralModule, defer_target

HEADS = {  # head name -> (kind, default features)
    "logistic": ("logistic", F.POSITION_FEATURES),
    "mlp": ("mlp", F.POSITION_FEATURES),
    "token-mlp": ("mlp", F.POSITION_FEATURES + F.TOKEN_FEATURES),
    "hidden-mlp": ("mlp", F.POSITION_FEATURES + HIDDEN_INPUTS),
}
DEFERRAL_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def train_deferral(
    traces: list[str] | str,
    out: Path,
    head: str = "mlp",
    objective: str = "gap",
    features: list[str] | None = None,
    alpha: float = 0.0,
    alpha_range: tuple[float, float] | None = None,
    hidden: int = 64,
    depth: int = 2,
    epochs: int = 30,
    patience: int | None = 3,
    batch_size: int = 1024,
    lr: float = 3e-3,
    val_fraction: float = 0.2,
    calibration: str = "platt",
    seed: int = 0,
    devices: int = 1,
    strategy: str = "auto",
    accelerator: str = "cpu",
    wandb_mode: str | None = None,
    wandb_project: str = "speccascade",
) -> DeferralHead:
    """Train a deferral head on trace directories and export it (config.json + model.safetensors).

    Args:
        traces: trace directories written by log-traces (a list, or one string, comma-separated).
        out: output directory: the head checkpoint, metrics.json, plots, comparison and training curves.
        head: logistic, mlp, token-mlp (token-level, per candidate token) or hidden-mlp (position features
            plus both models' last hidden states; needs traces logged with --hidden-states both).
        objective: gap (regression of loss_q - loss_p: defer where the predicted gain is largest; the default, and the
            best on held-out traces), classification (cost-sensitive BCE on 1[gap > 0]) or relaxed.
        features: feature names (default: every position feature; token-mlp adds the token features).
        alpha: the relaxed objective's cost of deferring, per unit of D_TV (validation's alpha when conditioned).
        alpha_range: relaxed objective only: train one head conditioned on alpha drawn from [low, high]
            (pass ``Learned(..., alpha=...)`` when decoding).
        hidden: hidden width of the MLP.
        depth: hidden layers of the MLP.
        epochs: the most passes over the training rows.
        patience: stop when the validation loss has not improved for this many epochs, and keep the best
            epoch's weights (null: train every epoch and keep the last).
        batch_size: rows per step.
        lr: AdamW learning rate.
        val_fraction: fraction of examples (not rows) held out for validation and calibration.
        calibration: platt, isotonic or none (gap heads are not calibrated).
        seed: seed of the split, the initialisation and the shuffling.
        devices: training processes (Lightning; e.g. 2 with strategy ddp).
        strategy: Lightning strategy (auto, ddp, ...).
        accelerator: cpu, gpu or auto (the heads are small: cpu is the default).
        wandb_mode: offline, online or disabled (default: online only where credentials exist).
        wandb_project: W&B project name.
    """
    if alpha_range is not None and objective != "relaxed":
        raise SpeccascadeError("alpha_range conditions a head on alpha; it needs objective 'relaxed'")
    if isinstance(traces, str):
        traces = [t for t in traces.split(",") if t]
    if head not in HEADS:
        raise SpeccascadeError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if calibration not in cal.METHODS:
        raise SpeccascadeError(f"unknown calibration {calibration!r}; choose one of {', '.join(cal.METHODS)}")
    wandb_mode = resolve_wandb_mode(wandb_mode)
    kind, default_features = HEADS[head]
    features = list(features or default_features)
    out = Path(out)
    pl.seed_everything(seed, workers=True, verbose=False)
    data = TraceDataModule([str(t) for t in traces], features, objective, val_fraction, batch_size, seed)
    data.setup()
    module = DeferralModule(features, data.mean, data.std, kind, hidden, depth, objective, alpha, lr,
                            alpha_range=tuple(alpha_range) if alpha_range is not None else None)
    loggers = [CSVLogger(out, name="logs")]
    if wandb_mode != "disabled":
        loggers.append(WandbLogger(project=wandb_project, save_dir=str(out), mode=wandb_mode, job_type="train-deferral"))
    best = KeepBest()
    callbacks = [EarlyStopping(monitor="val_loss", patience=patience), best] if patience else []
    trainer = pl.Trainer(max_epochs=epochs, logger=loggers, callbacks=callbacks, enable_checkpointing=False,
                         deterministic=True, enable_model_summary=False, default_root_dir=str(out), devices=devices,
                         strategy=strategy, accelerator=accelerator)
    trainer.fit(module, datamodule=data)
    if not trainer.is_global_zero:
        return module.head
    best.restore(module)

    trained = module.head.eval()
    logits, targets = _validation_scores(module, data, objective, alpha)
    metrics = {"train_rows": len(data.train_rows), "val_rows": len(logits)}
    out.mkdir(parents=True, exist_ok=True)
    if objective == "gap":  # the score is the predicted gap itself: defer where a gain is expected
        metrics["auroc"] = cal.auroc(targets, logits)
        values, default = logits, 0.0
    else:
        metrics["uncalibrated"] = cal.report(trained.probability(torch.from_numpy(logits)).numpy(), targets, logits)
        trained.calibration = cal.fit(calibration, logits, targets)
        values, default = trained.probability(torch.from_numpy(logits)).numpy(), 0.5
        metrics |= cal.report(values, targets, logits)
        cal.reliability_diagram(values, targets, out / "reliability.png")
    # thresholds that defer each rate of the validation positions
    trained.operating_points = {f"{r:g}": float(np.quantile(values, 1 - r)) for r in DEFERRAL_RATES} | {"default": default}
    trained.metrics = metrics
    trained.provenance = {"traces": [{"path": str(t), **{k: m.get(k) for k in ("fingerprint", "drafter", "target", "tokenizer")},
                                      **{k: m.get("config", {}).get(k) for k in ("task", "split", "data_file")}}
                                     for t, m in zip(traces, data.manifests)]}
    comparison = _offline_comparison(trained, data, out, metrics, alpha, seed)
    trained.save(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if wandb_mode != "disabled":
        _log_to_wandb(loggers[-1], out, metrics, comparison)
    return trained


class KeepBest(pl.Callback):
    """Keeps the head's weights from the epoch with the lowest validation loss (in memory: no pickle on disk)."""

    def __init__(self) -> None:
        self.loss, self.state = float("inf"), None

    def on_validation_end(self, trainer: pl.Trainer, module: DeferralModule) -> None:
        loss = trainer.callback_metrics.get("val_loss")
        if not trainer.sanity_checking and loss is not None and float(loss) < self.loss:
            self.loss, self.state = float(loss), {k: v.detach().clone() for k, v in module.head.state_dict().items()}

    def restore(self, module: DeferralModule) -> None:
        if self.state is not None:
            module.head.load_state_dict(self.state)


def _validation_scores(module: DeferralModule, data: TraceDataModule, objective: str, alpha: float):
    scores, targets = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            scores.append(module.head(module._inputs(batch["x"], alpha)))
            targets.append(defer_target(objective, batch["y"], alpha))
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()


def _offline_comparison(head: DeferralHead, data: TraceDataModule, out: Path, metrics: dict, alpha: float,
                        seed: int) -> dict | None:
    """The held-out comparison (:mod:`speccascade.evaluation.offline`) on the validation examples:
    the head against every rule family and the oracle, with bootstrap intervals."""
    val = data.val_all
    learned = rules.Learned(head, threshold=0.5, alpha=alpha)
    specs = offline.available(offline.DEFAULT_RULES, val.column_names)
    wanted = {*offline.LOSS_COLUMNS, *learned.features, *(f for spec in specs for f in rules.parse(spec).features)}
    if not wanted <= set(val.column_names):
        return None
    table = val.select_columns(sorted(wanted) + ["example_id"]).with_format("numpy")[:]
    columns = {c: torch.from_numpy(np.asarray(table[c], dtype=np.float32)) for c in sorted(wanted)}
    result = offline.compare_columns(columns, np.asarray(table["example_id"]), specs, {"learned": learned}, seed=seed)
    write_comparison(out, result, "comparison")
    judged = {label: c for label, c in result["candidates"].items() if c["kind"] != "oracle"}
    metrics["offline_area"] = {label: c["area"]["estimate"] for label, c in judged.items()}
    metrics["offline_rate_to_close_0.9"] = {label: c["rate_to_close"]["0.9"]["estimate"] for label, c in judged.items()}
    return result


def _log_to_wandb(logger: WandbLogger, out: Path, metrics: dict, comparison: dict | None) -> None:
    """Calibration plot, the held-out comparison (table, chart, plot), and the checkpoint as a `model` artifact."""
    import wandb

    run = logger.experiment
    run.summary.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    if (out / "reliability.png").exists():
        run.log({"reliability": wandb.Image(str(out / "reliability.png"))})
    if comparison:
        log_comparison(comparison, out, "comparison", mode="", project="", run=run)
    artifact = wandb.Artifact(f"deferral-head-{run.id}", type="model", metadata=metrics)
    for name in ("config.json", "model.safetensors", "metrics.json"):
        artifact.add_file(str(out / name))
    run.log_artifact(artifact)
    run.finish()
