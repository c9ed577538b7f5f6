"""``train-deferral``: fit a deferral head on traces, calibrate it, compare it offline with the
fixed rules, export a checkpoint, and log all of it locally and to W&B (offline by default).

Training saves ``checkpoints/last.ckpt`` after every epoch (atomically), so a run stopped by
SIGINT or SIGKILL continues with ``--resume`` from its last finished epoch; the checkpoint is
removed once the head is exported. A head that learned nothing usable (no optimisation step,
non-finite or constant scores) is an error, not an artefact.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ..data import traces as trace_dirs
from ..deferral import features as F
from ..deferral import rules
from ..deferral.heads import DEFERRAL_RATES, OBJECTIVES, DeferralHead
from ..deferral.spec import CONTEXT_INPUTS, HIDDEN_INPUTS, ID_INPUTS
from ..errors import SpeccascadeError
from ..listing import split_list
from ..evaluation import offline
from ..evaluation.report import log_comparison, write_comparison
from ..outdir import OutputDir, launched_child
from ..report import say, write_json, wrote
from ..settings import ACCELERATORS, LaunchSettings, OutputSettings, TrackingSettings, as_config, resolve_groups, seed_setting, setting
from ..tracking import head_artifact, run_path, start_run, trace_artifact, use_artifact
from ..version import __version__
from . import calibration as cal
from .data import TraceDataModule, check_columns
from .module import DeferralModule, defer_target

HEADS = {  # head name -> (kind, default features)
    "logistic": ("logistic", F.POSITION_FEATURES),
    "mlp": ("mlp", F.POSITION_FEATURES),
    "token-mlp": ("mlp", F.POSITION_FEATURES + F.TOKEN_FEATURES),
    "hidden-mlp": ("mlp", F.POSITION_FEATURES + HIDDEN_INPUTS),
    "outcome-mlp": ("mlp", F.POSITION_FEATURES + CONTEXT_INPUTS),
    "outcome-hidden-mlp": ("mlp", F.POSITION_FEATURES + CONTEXT_INPUTS + HIDDEN_INPUTS),
}
CHECKPOINT = Path("checkpoints") / "last.ckpt"


@dataclass(kw_only=True)
class TrainSettings(LaunchSettings, TrackingSettings, OutputSettings):
    """Settings of ``train-deferral`` (the shared groups, then its own)."""

    traces: list[str] | str = setting(help="trace directories written by log-traces (a list, or comma-separated)")
    head: Literal[tuple(HEADS)] = setting("mlp", "logistic, mlp, token-mlp (token-level, per candidate token), hidden-mlp "
                                          "(position features plus both models' last hidden states; needs traces logged with "
                                          "--hidden-states both), outcome-mlp (position features plus the drafted and the "
                                          "target's token ids, embedded, and the position in the reply: what Gain cannot "
                                          "read) or outcome-hidden-mlp (outcome-mlp plus both hidden states)")
    objective: Literal[OBJECTIVES] = setting("gap", "gap (regression of loss_q - loss_p: defer where the predicted gain "
                                             "is largest; the default, and the best on held-out traces), classification "
                                             "(cost-sensitive BCE on 1[gap > 0]), relaxed, or outcome (BCE on outcome_harm: "
                                             "needs on-policy traces logged with --labels outcome)")
    gap_weight: float = setting(0.0, "outcome objective: weight of the target-as-oracle gap p_gap in the BCE label "
                                "(1 - w) * outcome_harm + w * p_gap (0: outcome labels alone)", low=0.0, high=1.0)
    features: list[str] | str | None = setting(None, "feature names, a list or comma-separated (default: every position "
                                               "feature; token-mlp adds the token features)")
    alpha: float = setting(0.0, "the relaxed objective's cost of deferring, per unit of D_TV (validation's alpha when conditioned)", low=0.0)
    alpha_range: tuple[float, float] | None = setting(None, "relaxed objective only: train one head conditioned on alpha drawn "
                                                      "from [low, high] (pass Learned(..., alpha=...) when decoding)", low=0.0)
    hidden: int = setting(64, "hidden width of the MLP (at most 4096: a head is small beside the models)", low=1, high=4096)
    depth: int = setting(2, "hidden layers of the MLP (at most 8)", low=1, high=8)
    embed_dim: int = setting(8, "width of the head's embedding of each token id (draft_token, target_token)", low=1, high=256)
    vocab_size: int | None = setting(None, "the pair's vocabulary size, for heads on token ids, where the traces do not "
                                     "record it (traces logged before it was recorded); must match where they do", low=1)
    epochs: int = setting(30, "the most passes over the training rows", low=1)
    patience: int | None = setting(3, "stop when the validation loss has not improved for this many epochs and keep the "
                                   "best epoch's weights (null: train every epoch and keep the last)", low=1)
    batch_size: int = setting(1024, "rows per step", low=1)
    lr: float = setting(3e-3, "AdamW learning rate", above=0.0)
    val_fraction: float = setting(0.2, "fraction of examples (not rows) held out for validation and calibration", above=0.0, below=1.0)
    calibration: Literal[cal.METHODS] = setting("platt", "platt, isotonic or none (gap heads are not calibrated)")
    seed: int = seed_setting("seed of the split, the initialisation and the shuffling")
    strategy: str = setting("auto", "Lightning strategy (auto, ddp, ...)")
    accelerator: Literal[ACCELERATORS] = setting("cpu", "cpu, cuda (gpu), mps or auto (the heads are small: cpu is the default)")
    mix_pairs: bool = setting(False, "allow traces of different model pairs in one training run")

    def config(self, manifests: list[dict]) -> dict:
        """What the head depends on: a directory written with another config is refused."""
        return as_config(self, ("traces", "head", "objective", "features", "alpha", "alpha_range", "hidden", "depth", "epochs",
                                "patience", "batch_size", "lr", "val_fraction", "calibration", "seed", "mix_pairs")) | {
            "trace_fingerprints": [m.get("fingerprint") for m in manifests]} | (
            {"gap_weight": self.gap_weight} if self.objective == "outcome" else {})


@dataclass
class _Plan:
    """Resolved settings: everything checked, nothing loaded or written yet."""

    settings: TrainSettings
    kind: str
    features: list[str]
    manifests: list[dict]
    out: OutputDir
    hidden_widths: dict[str, int]  # of each hidden-state input the head reads, the same in every trace directory
    vocab_size: int | None  # of the token ids the head embeds (None: it reads none)


def train_deferral(traces: list[str] | str, out, **options) -> DeferralHead:
    """Train a deferral head on trace directories and export it (config.json + model.safetensors).

    ``options`` are the fields of :class:`TrainSettings` (the command line's flags); returns the head.
    """
    return run(resolve(TrainSettings(traces=traces, out=out, **options)))


def resolve(settings: TrainSettings) -> _Plan:
    """Check every setting, the traces' manifests (complete, readable by this code, one pair) and the
    output directory; load no rows, write nothing."""
    s = resolve_groups(settings)
    s.traces = split_list(s.traces, "--traces")
    if len(set(s.traces)) != len(s.traces):
        raise SpeccascadeError(f"--traces names a trace directory more than once: {', '.join(s.traces)}")
    if s.alpha_range is not None and (s.objective != "relaxed" or s.alpha_range[0] > s.alpha_range[1]):
        raise SpeccascadeError("--alpha-range [low, high] conditions a head on alpha; it needs objective 'relaxed' and low <= high")
    if s.gap_weight and s.objective != "outcome":
        raise SpeccascadeError(f"--gap-weight mixes p_gap into the outcome labels; it needs objective 'outcome' (got {s.objective!r})")
    if s.strategy != "auto" and s.strategy not in pl.strategies.StrategyRegistry.available_strategies():
        raise SpeccascadeError(f"unknown strategy {s.strategy!r}; choose auto, ddp or another Lightning strategy")
    if s.features is not None:
        s.features = split_list(s.features, "--features")
    kind, default_features = HEADS[s.head]
    features = list(s.features or default_features)
    unknown = sorted(set(features) - set(F.ALL_FEATURES + HIDDEN_INPUTS + CONTEXT_INPUTS))
    if unknown or len(set(features)) != len(features):
        raise SpeccascadeError(f"--features must be distinct names of the feature spec; unknown: {unknown}")
    manifests = [_trainable(t) for t in s.traces]
    if s.objective == "outcome":
        bare = [t for t, m in zip(s.traces, manifests) if "outcome_labels" not in m]
        if bare:
            raise SpeccascadeError(f"objective 'outcome' needs outcome labels, and traces {', '.join(bare)} have none "
                                   "(log them with log-traces --mode on-policy --labels outcome)")
    pairs = {trace_dirs.pair_of(m) for m in manifests}
    if len(pairs) > 1 and not s.mix_pairs:
        names = "; ".join(f"{t}: {m.get('drafter')} -> {m.get('target')}" for t, m in zip(s.traces, manifests))
        raise SpeccascadeError(f"the traces come from different model pairs ({names}); pass --mix-pairs to train on them together")
    for directory, manifest in zip(s.traces, manifests):
        check_columns(trace_dirs.columns(directory, manifest), [f for f in features if f not in HIDDEN_INPUTS], s.objective)
    widths = _hidden_widths(features, s.traces, manifests)
    vocab_size = _vocab_size(features, s.traces, manifests, s.vocab_size)
    config = s.config(manifests) | ({"embed_dim": s.embed_dim, "vocab_size": vocab_size} if vocab_size else {})
    out = OutputDir(s.out, "train-deferral", config, s.resume, s.overwrite, progress=(str(CHECKPOINT),))
    return _Plan(s, kind, features, manifests, out.check(), widths, vocab_size)


def _vocab_size(features: list[str], directories: list[str], manifests: list[dict], given: int | None) -> int | None:
    """The vocabulary of the token ids a head embeds: the one the traces record (every directory the same), or
    ``--vocab-size`` where none records it; None for a head that reads no token id."""
    if not set(features) & set(ID_INPUTS):
        return None
    recorded = {d: trace_dirs.source(d, m).vocab_size for d, m in zip(directories, manifests)}
    sizes = {v for v in recorded.values() if v is not None}
    if len(sizes) > 1:
        raise SpeccascadeError("the trace directories record different vocabularies ("
                               + "; ".join(f"{d}: {v}" for d, v in recorded.items()) + "); one head embeds one")
    if sizes and given is not None and given not in sizes:
        raise SpeccascadeError(f"--vocab-size {given} differs from the vocabulary of {sizes.pop()} tokens the traces record")
    if not sizes and given is None:
        raise SpeccascadeError(f"the head embeds token ids, and traces {', '.join(directories)} record no vocabulary "
                               "size; pass --vocab-size (the pair's vocabulary) or log them again")
    return sizes.pop() if sizes else given


def _hidden_widths(features: list[str], directories: list[str], manifests: list[dict]) -> dict[str, int]:
    """The width of each hidden-state feature, which every trace directory must hold at one width (read off the
    shards' schema, before any row is loaded)."""
    hidden = [f for f in features if f in HIDDEN_INPUTS]
    if not hidden:
        return {}
    sources = [trace_dirs.source(d, m) for d, m in zip(directories, manifests)]
    for name in hidden:
        bare = [s.name for s in sources if name not in s.hidden_widths]
        if bare:
            raise SpeccascadeError(f"the head reads {name}, which {', '.join(bare)} do not hold (log them with "
                                   "log-traces --hidden-states both)")
        widths = {s.hidden_widths[name] for s in sources}
        if len(widths) > 1:
            named = "; ".join(f"{s.name}: {s.hidden_widths[name]}" for s in sources)
            raise SpeccascadeError(f"{name} differs in width between the trace directories ({named}); one head reads one width")
    return {name: sources[0].hidden_widths[name] for name in hidden}


def _trainable(directory: str) -> dict:
    manifest = trace_dirs.read_manifest(directory)
    if not manifest.get("complete"):
        raise SpeccascadeError(f"traces in {directory} are incomplete; finish them with log-traces --resume")
    if not manifest.get("rows"):
        raise SpeccascadeError(f"traces in {directory} have no rows")
    trace_dirs.check_readable(manifest, directory)
    return manifest


def run(plan: _Plan) -> DeferralHead:
    """Train (or continue training), check the head is usable, export it."""
    s, out = plan.settings, Path(plan.settings.out)
    with plan.out.claim():
        if plan.out.complete:
            print(f"train-deferral: {out} holds a finished head of these settings; nothing to do")
            return summarise(DeferralHead.load(out), out)
        pl.seed_everything(s.seed, workers=True, verbose=False)
        data = TraceDataModule(s.traces, plan.features, s.objective, s.val_fraction, s.batch_size, s.seed, plan.vocab_size)
        data.setup()
        module = DeferralModule(plan.features, data.mean, data.std, plan.kind, s.hidden, s.depth, s.objective, s.alpha, s.lr,
                                alpha_range=tuple(s.alpha_range) if s.alpha_range is not None else None,
                                gap_weight=s.gap_weight, vocab_size=plan.vocab_size, embed_dim=s.embed_dim)
        trainer, wandb_run = _fit(s, out, module, data, plan.out.config)
        if not trainer.is_global_zero:
            return module.head
        head = _export(plan, module, data, trainer, wandb_run)
        plan.out.finish()
        shutil.rmtree(out / CHECKPOINT.parent, ignore_errors=True)  # once marked complete: an interrupt keeps one or the other
    return summarise(head, out)


SCORES = {"auroc": "AUROC", "ece": "ECE", "brier": "Brier"}  # the summary's validation metrics, those a head has
OUTPUTS = ("config.json", "model.safetensors", "metrics.json", "comparison.md", "comparison.png", "reliability.png")


def summarise(head: DeferralHead, out: Path) -> DeferralHead:
    """Print the head's validation metrics, its operating points and where it is; returns the head."""
    m = head.metrics
    scores = ", ".join(f"{label} {_score(m[name])}" for name, label in SCORES.items() if name in m)
    points = ", ".join(f"{rate}: {threshold:.4g}" for rate, threshold in head.operating_points.items())
    say("train-deferral", f"validation on {m.get('val_rows')} rows ({m.get('train_rows')} trained on): {scores}",
        f"operating points (deferral rate of validation positions: threshold): {points}",
        wrote(out, note=", ".join(name for name in OUTPUTS if (out / name).exists())) + f"; decode with learned:{out}")
    return head


def _score(value: float | None) -> str:
    """A metric to 3 decimals; ``undefined`` where it is NaN or null (one class only among the validation rows)."""
    return "undefined" if value is None or value != value else f"{value:.3f}"


def _fit(s: TrainSettings, out: Path, module: DeferralModule, data: TraceDataModule, config: dict):
    """``trainer.fit`` from the last checkpoint when resuming, then the best epoch's weights when stopping
    early (``--patience``); a SIGINT is a KeyboardInterrupt (exit 130)."""
    best = KeepBest()
    resume_from = out / CHECKPOINT if (out / CHECKPOINT).is_file() else None
    earlier = _earlier_metrics(out, resume_from)
    loggers = [CSVLogger(out, name="logs", version=0)]
    wandb_run = None
    if s.wandb_mode != "disabled" and not launched_child():
        wandb_run = start_run(out, s.wandb_project, s.wandb_mode, "train-deferral", config, s.wandb_group)
        for directory in s.traces:
            use_artifact(wandb_run, trace_artifact(directory))
        loggers.append(WandbLogger(experiment=wandb_run))
    for step, metrics in earlier:  # the curves of the epochs before the checkpoint, kept in logs/version_0
        loggers[0].log_metrics(metrics, step)
    steps = -(-len(data.train_rows) // s.batch_size)
    every_epoch = ModelCheckpoint(dirpath=out / CHECKPOINT.parent, filename=CHECKPOINT.stem, enable_version_counter=False)
    callbacks = [every_epoch, best]
    if s.patience:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=s.patience))
    trainer = pl.Trainer(max_epochs=s.epochs, logger=loggers, deterministic=True, enable_model_summary=False,
                         callbacks=callbacks,
                         plugins=[_AtomicCheckpointIO()], default_root_dir=str(out), devices=s.devices,
                         num_nodes=s.num_nodes, strategy=s.strategy, accelerator=s.accelerator,
                         log_every_n_steps=max(1, min(50, steps)))
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
    except SystemExit:  # Lightning ends an interrupted fit with exit(1)
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    if s.patience:
        best.restore(module)
    return trainer, wandb_run


class _AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name and renamed: a kill never leaves half a checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        tmp = Path(path).with_name(f".tmp-{Path(path).name}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def _earlier_metrics(out: Path, checkpoint: Path | None) -> list[tuple[int, dict]]:
    """The logged metrics of the steps a checkpoint holds; the rest of the old log is removed."""
    log_dir = out / "logs" / "version_0"
    rows = []
    if checkpoint is not None and (log_dir / "metrics.csv").is_file():
        try:
            step = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])
        except Exception as err:
            raise SpeccascadeError(f"checkpoint {checkpoint} is unreadable ({type(err).__name__}); pass --overwrite to start again") from None
        with (log_dir / "metrics.csv").open(newline="") as f:
            rows = [(int(r.pop("step")), {k: float(v) for k, v in r.items() if v != ""}) for r in csv.DictReader(f)]
        rows = [(s, m) for s, m in rows if s < step]
    shutil.rmtree(log_dir, ignore_errors=True)
    return rows


def _export(plan: _Plan, module: DeferralModule, data: TraceDataModule, trainer: pl.Trainer, wandb_run) -> DeferralHead:
    """Refuse a degenerate head; calibrate it, pick its operating points, compare it offline, save everything."""
    s, out = plan.settings, Path(plan.settings.out)
    trained = module.head.eval()
    logits, targets = _validation_scores(module, data, s.objective, s.alpha)
    _refuse_degenerate(out, trainer.global_step, logits, s.lr)
    metrics = {"train_rows": len(data.train_rows), "val_rows": len(logits)}
    if s.objective == "gap":  # the score is the predicted gap itself: defer where a gain is expected
        metrics["auroc"] = cal.auroc(targets, logits)
        values, default = logits, 0.0
    else:
        metrics["uncalibrated"] = cal.report(trained.probability(torch.from_numpy(logits)).numpy(), targets, logits)
        trained.calibration = cal.fit(s.calibration, logits, targets)
        values, default = trained.probability(torch.from_numpy(logits)).numpy(), 0.5
        _refuse_degenerate(out, trainer.global_step, values, s.lr, what="calibrated probabilities")
        metrics |= cal.report(values, targets, logits)
        cal.reliability_diagram(values, targets, out / "reliability.png")
    # thresholds that defer each rate of the validation positions
    trained.record_thresholds({r: float(np.quantile(values, 1 - r)) for r in DEFERRAL_RATES}, default)
    trained.metrics = metrics
    trained.provenance = {"speccascade_version": __version__, "hidden_widths": plan.hidden_widths, "traces": [
        {"path": str(t), **{k: m.get(k) for k in ("fingerprint", "drafter", "target", "tokenizer", "schema_version")},
         "feature_spec": (m.get("feature_spec") or {}).get("version"),
         **{k: m.get("config", {}).get(k) for k in ("task", "split", "data_file")}} for t, m in zip(s.traces, plan.manifests)]}
    comparison = _offline_comparison(trained, data, out, metrics, s.alpha, s.seed)
    trained.save(out)
    write_json(out / "metrics.json", metrics)
    if wandb_run is not None:
        print(f"W&B run: {run_path(wandb_run)}")
        _log_to_wandb(wandb_run, out, metrics, comparison)
    return trained


def _refuse_degenerate(out: Path, steps: int, scores: np.ndarray, lr: float, what: str = "scores") -> None:
    """A head trained for no step, or whose validation scores are non-finite or all equal, is not exported."""
    problem = None
    if steps == 0:
        problem = "training took no optimisation step"
    elif not np.isfinite(scores).all():
        problem = f"the head's validation {what} are not finite (training diverged; try a --lr below {lr:g})"
    elif np.ptp(scores) <= 1e-7 * max(1.0, float(np.abs(scores).max())):
        problem = f"the head gives every validation row the same {what[:-1] if what.endswith('s') else what}, so it ranks nothing"
    if problem:
        shutil.rmtree(out / CHECKPOINT.parent, ignore_errors=True)
        raise SpeccascadeError(f"{problem}; no head exported")


class KeepBest(pl.Callback):
    """Keeps the head's weights from the epoch with the lowest validation loss; they travel in Lightning's
    checkpoint (``state_dict``), so a resumed run still returns the best epoch."""

    def __init__(self) -> None:
        self.loss, self.state = float("inf"), None

    def on_validation_end(self, trainer: pl.Trainer, module: DeferralModule) -> None:
        loss = trainer.callback_metrics.get("val_loss")
        if not trainer.sanity_checking and loss is not None and float(loss) < self.loss:
            self.loss, self.state = float(loss), {k: v.detach().clone() for k, v in module.head.state_dict().items()}

    def state_dict(self) -> dict:
        return {"loss": self.loss, "state": self.state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loss, self.state = state_dict["loss"], state_dict["state"]

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
    wanted = {*offline.LOSS_COLUMNS, *learned.columns, *(c for spec in specs for c in rules.parse(spec).build().columns)}
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


def _log_to_wandb(run, out: Path, metrics: dict, comparison: dict | None) -> None:
    """Calibration plot, the held-out comparison (table, chart, plot), and the checkpoint as a `model` artifact."""
    import wandb

    run.summary.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    if (out / "reliability.png").exists():
        run.log({"reliability": wandb.Image(str(out / "reliability.png"))})
    if comparison:
        log_comparison(comparison, out, "comparison", run)
    run.log_artifact(head_artifact(out))
    run.finish()
