"""``speccascade finetune``: supervised fine-tuning of a model on a task's train split (Lightning), exported as
an ordinary Hugging Face directory, with a provenance file and its held-out quality with a 95% interval."""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from ..data.tasks import get_task
from ..decoding import ModelPair
from ..errors import SpeccascadeError
from ..outdir import LOCK, locked
from ..settings import TrackingSettings, resolve_groups
from ..tracking import start_run
from .data import FinetuneDataModule
from .models import export, load_model
from .module import FinetuneModule
from .quality import heldout_report

PRECISIONS = ("auto", "bf16-mixed", "32-true", "16-mixed")
PROVENANCE = "finetune.json"  # written last: its presence marks a finished fine-tune
SETTINGS = "finetune-settings.json"  # the settings of a run in progress (a resume must match them)


def parse_layers(layers: str | list[int] | None) -> list[int] | None:
    """``"0-7,26-29"`` or ``[0, 1, 2]`` -> a list of layer indices (None keeps every layer)."""
    if layers is None or isinstance(layers, list):
        return layers
    out: list[int] = []
    try:
        for part in str(layers).split(","):
            low, dash, high = part.strip().partition("-")
            out += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    except ValueError:
        raise SpeccascadeError(f"layers must look like '0-7,26-29' or [0, 1, 2], got {layers!r}") from None
    return out


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 autocast where the device computes in bf16 natively (CUDA, CPUs with AVX512-BF16/AMX), else float32."""
    if precision not in PRECISIONS:
        raise SpeccascadeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def _check(settings: dict, out: Path) -> None:
    s = settings
    for key in ("steps", "batch_size", "checkpoint_every", "eval_batch_size", "max_new_tokens"):
        if s[key] < 1:
            raise SpeccascadeError(f"{key} must be >= 1, got {s[key]}")
    for key in ("lora_rank", "eval_examples", "warmup_steps", "weight_decay"):
        if s[key] < 0:
            raise SpeccascadeError(f"{key} must be >= 0, got {s[key]}")
    if s["examples"] is not None and s["examples"] < 1:
        raise SpeccascadeError(f"examples must be >= 1, got {s['examples']}")
    if s["lr"] <= 0 or s["distill_temperature"] <= 0:
        raise SpeccascadeError("lr and distill_temperature must be > 0")
    if not 0 <= s["min_lr_ratio"] <= 1 or not 0 <= s["distill_weight"] <= 1:
        raise SpeccascadeError("min_lr_ratio and distill_weight must lie in [0, 1]")
    if s["distill_weight"] > 0 and not s["teacher"]:
        raise SpeccascadeError("distill_weight > 0 needs a teacher model (--teacher DIR)")
    if s["layers"] is not None and (not s["layers"] or len(set(s["layers"])) != len(s["layers"]) or min(s["layers"]) < 0):
        raise SpeccascadeError(f"layers must be distinct indices >= 0, got {s['layers']}")
    if out.exists() and not out.is_dir():
        raise SpeccascadeError(f"output path {out} is a file, not a directory")
    get_task(s["task"])  # an unknown task fails before any model loads


def _prepare_out(out: Path, settings: dict) -> dict | None:
    """The finished run's provenance when ``out`` already holds this fine-tune; refuses another run's directory."""
    if (out / PROVENANCE).exists():
        done = json.loads((out / PROVENANCE).read_text())
        if done.get("recipe") != settings:
            raise SpeccascadeError(f"{out} holds a fine-tune with other settings; choose another --out")
        return done
    if (out / SETTINGS).exists():
        if json.loads((out / SETTINGS).read_text()) != settings:
            raise SpeccascadeError(f"{out} holds an unfinished fine-tune with other settings; choose another --out or delete it")
    elif any(child.name != LOCK for child in out.iterdir()):
        raise SpeccascadeError(f"{out} exists and is not a fine-tune directory; choose an empty or new --out")
    return None


def finetune(
    out: Path,
    base: str = "smollm2-135m",
    task: str = "arithmetic",
    data_file: str | None = None,
    layers: str | list[int] | None = None,
    steps: int = 200,
    batch_size: int = 16,
    examples: int | None = None,
    pack_length: int = 512,
    lr: float = 1e-4,
    warmup_steps: int = 10,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    lora_rank: int = 0,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.0,
    lora_targets: list[str] | None = None,
    teacher: str | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 1.0,
    precision: str = "auto",
    checkpoint_every: int = 25,
    eval_split: str = "test",
    eval_examples: int = 256,
    eval_batch_size: int = 16,
    max_new_tokens: int = 96,
    eval_seed: int = 0,
    seed: int = 0,
    accelerator: str = "auto",
    wandb_mode: str | None = None,
    wandb_project: str = "speccascade",
    wandb_group: str | None = None,
) -> dict:
    """Fine-tune a model on a task's train split (loss on the reference reply only) and export it.

    Args:
        out: output directory: a Hugging Face model directory (config, safetensors, tokenizer, generation
            config) plus finetune.json (provenance, recipe, held-out quality), heldout.json (per example),
            logs/ (CSV curves) and wandb/. A killed run continues from its last checkpoint when rerun.
        base: model to start from: a preset name (its target, e.g. smollm2-135m), a local directory or a hub id.
        task: task whose train split is learned (arithmetic is generated: no data needed).
        data_file: local JSONL/parquet file of the task's records instead of the hub dataset.
        layers: keep only these decoder layers of base ("0-7,26-29" or [0, 1, 2]): a standalone layer-subset
            drafter with its own weights.
        steps: optimizer steps.
        batch_size: examples per step (data seen = steps x batch_size examples).
        examples: distinct training examples, cycled in a new order each pass (default: steps x batch_size,
            every step sees new ones).
        pack_length: tokens per packed row; a step's examples are packed into as few rows as fit.
        lr: AdamW peak learning rate.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine decay ends at min_lr_ratio x lr.
        weight_decay: AdamW weight decay.
        lora_rank: 0 = full fine-tuning; r > 0 trains rank-r LoRA adapters (peft), merged on export.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
        lora_targets: module names that get adapters (default: every attention and MLP projection).
        teacher: model directory (or preset / hub id) whose distribution the model is distilled towards,
            and whose held-out quality and greedy agreement are reported beside the model's.
        distill_weight: w in (1 - w) x cross-entropy + w x KL(teacher || model) (DistillSpec-style).
        distill_temperature: temperature of both distributions in the KL term.
        precision: auto (bf16 autocast where the hardware supports it, else float32), bf16-mixed, 32-true, 16-mixed.
        checkpoint_every: steps between checkpoints (the last one is kept for resuming; removed when done).
        eval_split: held-out split decoded greedily at the end.
        eval_examples: held-out examples (0 skips the evaluation).
        eval_batch_size: examples decoded together in the evaluation.
        max_new_tokens: new tokens per held-out example.
        eval_seed: seed of the held-out examples (0: the ones `speccascade evaluate` decodes by default),
            independent of the training seed.
        seed: seed of the training examples (generated tasks), their order and the initialisation.
        accelerator: cpu, gpu or auto.
        wandb_mode: offline, online or disabled (default: online only where credentials exist).
        wandb_project: W&B project name.
        wandb_group: W&B group of this run (a pipeline's runs together).
    """
    out = Path(out)
    settings = {k: v for k, v in locals().items() if k not in ("out", "accelerator") and not k.startswith("wandb_")}
    settings["layers"] = parse_layers(layers)
    _check(settings, out)
    tracking = resolve_groups(TrackingSettings(wandb_mode=wandb_mode, wandb_project=wandb_project, wandb_group=wandb_group))
    resolved = resolve_precision(precision, accelerator)
    with locked(out, "finetune"):  # one writer: a second fine-tune into this --out is refused while this one runs
        done = _prepare_out(out, settings)
        if done is not None:
            print(f"{out} already holds this fine-tune; {summary_line(done)}")
            return done
        return _finetune(settings, out, resolved, accelerator, tracking)


def _finetune(settings: dict, out: Path, resolved: str, accelerator: str, tracking: TrackingSettings) -> dict:
    """Train, export, evaluate held out, and record the provenance (under the directory's lock)."""
    s = settings
    started = time.perf_counter()
    data_seen, run = _train(settings, out, resolved, accelerator, tracking)
    provenance = {
        "format": "speccascade-finetune/1", "base": s["base"], "task": s["task"],
        "mode": "lora" if s["lora_rank"] > 0 else "full", "layers": s["layers"], "teacher": s["teacher"],
        "steps": s["steps"], "data_seen": data_seen, "precision": resolved,
        "train_wall_s": round(time.perf_counter() - started, 1), "recipe": settings,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if s["eval_examples"] > 0:
        report = _heldout(settings, out, accelerator)
        (out / "heldout.json").write_text(json.dumps(report, indent=2))
        provenance["heldout"] = {k: v for k, v in report.items() if k != "records"}
    if run is not None:  # the held-out numbers join the run, which is closed so that the next one is new
        run.summary.update({"heldout_" + k: v for k, v in _flat(provenance.get("heldout", {})).items()})
        run.finish()
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / SETTINGS).unlink(missing_ok=True)
    print(summary_line(provenance))
    return provenance


def _train(s: dict, out: Path, precision: str, accelerator: str, tracking: TrackingSettings):
    """Fit (from the last checkpoint when one is there) and export the model; the examples seen and the W&B run."""
    pl.seed_everything(s["seed"], workers=True, verbose=False)
    module = FinetuneModule(s["base"], s["steps"], s["layers"], s["lr"], s["warmup_steps"], s["min_lr_ratio"],
                            s["weight_decay"], s["lora_rank"], s["lora_alpha"], s["lora_dropout"], s["lora_targets"],
                            s["teacher"], s["distill_weight"], s["distill_temperature"])
    plain = module.model.get_base_model() if s["lora_rank"] > 0 else module.model
    pair = ModelPair(plain, plain, module.tokenizer, "finetune", module.base_id, module.base_id)
    module.model.train()  # the pair put it in eval mode
    data = FinetuneDataModule(pair, s["task"], s["steps"], s["batch_size"], s["examples"], s["pack_length"], s["data_file"],
                              s["seed"])
    data.setup()
    (out / SETTINGS).write_text(json.dumps(s, indent=2))
    loggers = [CSVLogger(out, name="logs")]
    if tracking.wandb_mode != "disabled":
        loggers.append(WandbLogger(experiment=start_run(out, tracking.wandb_project, tracking.wandb_mode, "finetune", s,
                                                        tracking.wandb_group)))
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=s["checkpoint_every"], save_last=True,
                                  save_top_k=0, save_on_train_epoch_end=False)
    trainer = pl.Trainer(max_steps=s["steps"], max_epochs=-1, precision=precision, accelerator=accelerator, devices=1,
                         logger=loggers, callbacks=[checkpoints, TQDMProgressBar()], gradient_clip_val=1.0, log_every_n_steps=1,
                         enable_model_summary=False, num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1,
                         default_root_dir=str(out))
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None)
    export(module.model.cpu(), module.tokenizer, out)
    return data.seen(), loggers[-1].experiment if len(loggers) > 1 else None


def _heldout(s: dict, out: Path, accelerator: str) -> dict:
    """The exported model's held-out quality (and the teacher's, with their agreement), greedy."""
    model, tokenizer, _ = load_model(str(out), device="cuda" if torch.cuda.is_available() and accelerator != "cpu" else "cpu")
    reference = load_model(s["teacher"], device=model.device)[0] if s["teacher"] else model
    pair = ModelPair(model, reference, tokenizer, "finetune", str(out), s["teacher"] or str(out))
    return heldout_report(pair, s["task"], s["eval_split"], s["eval_examples"], s["max_new_tokens"], s["eval_batch_size"],
                          s["data_file"], s["eval_seed"], teacher=bool(s["teacher"]))


def summary_line(provenance: dict) -> str:
    """One line: what was trained and its held-out quality with the 95% interval."""
    line = f"fine-tuned {provenance['base']} on {provenance['task']} ({provenance['mode']}, {provenance['steps']} steps)"
    held = provenance.get("heldout")
    if not held:
        return line + "; no held-out evaluation"
    q = held["quality"]
    line += (f"; held-out {held['metric']} on {held['split']} ({held['examples']} examples, greedy): "
             f"{q['estimate']:.3f} [95% CI {q['low']:.3f}, {q['high']:.3f}]")
    if "teacher_quality" in held:
        t, d, a = held["teacher_quality"], held["teacher_minus_model"], held["greedy_agreement"]
        line += (f"; teacher {t['estimate']:.3f} [{t['low']:.3f}, {t['high']:.3f}], teacher - model "
                 f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]; greedy agreement with the teacher "
                 f"{a['estimate']:.3f} [{a['low']:.3f}, {a['high']:.3f}]")
    return line


def _flat(held: dict) -> dict[str, float]:
    """``{"quality": {"estimate": .., "low": ..}}`` -> ``{"quality": .., "quality_low": ..}`` (numbers only)."""
    out = {}
    for key, value in held.items():
        if isinstance(value, dict):
            out |= {key if k == "estimate" else f"{key}_{k}": v for k, v in value.items()}
        elif isinstance(value, (int, float)):
            out[key] = value
    return out
