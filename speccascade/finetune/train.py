"""``speccascade finetune``: supervised fine-tuning of a model on a task's train split (Lightning), exported as
an ordinary Hugging Face directory, with a provenance file and its held-out quality with a 95% interval."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from ..data.tasks import get_task
from ..decoding import ModelPair
from ..errors import SpeccascadeError
from ..outdir import LOCK, locked, writable
from ..report import read_json, say, write_json, wrote
from ..settings import ACCELERATORS, EXAMPLES_HIGH, TrackingSettings, as_config, resolve_groups, seed_setting, setting
from ..tracking import start_run
from .data import FinetuneDataModule
from .models import check_model, export, load_model
from .module import FinetuneModule, ModelRecipe
from .quality import heldout_report

PRECISIONS = ("auto", "bf16-mixed", "32-true", "16-mixed")
PROVENANCE = "finetune.json"  # written last: its presence marks a finished fine-tune
SETTINGS = "finetune-settings.json"  # the settings of a run in progress (a resume must match them)
RECIPE = ("base", "task", "data_file", "layers", "steps", "batch_size", "examples", "pack_length", "lr", "warmup_steps",
          "min_lr_ratio", "weight_decay", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "teacher",
          "distill_weight", "distill_temperature", "precision", "checkpoint_every", "eval_split", "eval_examples",
          "eval_batch_size", "max_new_tokens", "eval_seed", "seed")  # the recipe's keys, in their recorded order


@dataclass(kw_only=True)
class FinetuneSettings(TrackingSettings, ModelRecipe):
    """Settings of ``finetune``: the model recipe (:class:`ModelRecipe`), the data, the held-out evaluation."""

    out: Path = setting(help="output directory: a Hugging Face model directory (config, safetensors, tokenizer, generation "
                        "config) plus finetune.json (provenance, recipe, held-out quality), heldout.json (per example), "
                        "logs/ (CSV curves) and wandb/. A killed run continues from its last checkpoint when rerun")
    task: str = setting("arithmetic", "task whose train split is learned (arithmetic is generated: no data needed)")
    data_file: str | None = setting(None, "local JSONL/parquet file of the task's records instead of the hub dataset")
    batch_size: int = setting(16, "examples per step (data seen = steps x batch_size examples; at most 65536)", low=1,
                              high=65536)
    examples: int | None = setting(None, "distinct training examples, cycled in a new order each pass (default: steps x "
                                   "batch_size, every step sees new ones)", low=1)
    pack_length: int = setting(512, "tokens per packed row; a step's examples are packed into as few rows as fit", low=1)
    precision: str = setting("auto", "auto (bf16 autocast where the hardware supports it, else float32), bf16-mixed, "
                             "32-true, 16-mixed")
    checkpoint_every: int = setting(25, "steps between checkpoints (the last one is kept for resuming; removed when done)",
                                    low=1)
    eval_split: str = setting("test", "held-out split decoded greedily at the end")
    eval_examples: int = setting(256, "held-out examples (0 skips the evaluation)", low=0, high=EXAMPLES_HIGH)
    eval_batch_size: int = setting(16, "examples decoded together in the evaluation", low=1)
    max_new_tokens: int = setting(96, "new tokens per held-out example", low=1)
    eval_seed: int = seed_setting("seed of the held-out examples (0: the ones `speccascade evaluate` decodes by default), "
                                  "independent of the training seed")
    seed: int = seed_setting("seed of the training examples (generated tasks), their order and the initialisation")
    accelerator: Literal[ACCELERATORS] = setting("auto", "cpu, cuda (gpu), mps or auto")

    def recipe(self) -> dict:
        """What the model depends on (every setting but --out, --accelerator and W&B's): recorded as finetune.json's
        ``recipe``; a directory that holds another recipe is refused."""
        return as_config(self, RECIPE)


@dataclass
class _Plan:
    """Resolved settings: everything checked, nothing loaded or written yet."""

    settings: FinetuneSettings
    recipe: dict
    precision: str


def finetune(out: Path, **options) -> dict:
    """Fine-tune a model on a task's train split (loss on the reference reply only) and export it.

    ``options`` are the fields of :class:`FinetuneSettings` (the command line's flags); returns the provenance.
    """
    return run(resolve(FinetuneSettings(out=out, **options)))


def resolve(settings: FinetuneSettings) -> _Plan:
    """Check every setting, the output path, the task's splits and the models' names; load no weights, write nothing."""
    s = resolve_groups(settings)
    s.check_recipe()
    writable(s.out)
    if (s.examples or s.steps * s.batch_size) > EXAMPLES_HIGH:
        raise SpeccascadeError(f"finetune prepares its {s.examples or s.steps * s.batch_size} training examples (--examples, "
                               f"else --steps x --batch-size) before the first step; at most {EXAMPLES_HIGH} (they are cycled: "
                               "pass a smaller --examples)")
    task = get_task(s.task)  # an unknown task, split or data file fails before any model loads
    task.examples("train", limit=1, data_file=s.data_file, seed=s.seed)
    if s.eval_examples > 0:
        try:
            task.examples(s.eval_split, limit=1, data_file=s.data_file, seed=s.eval_seed)
        except SpeccascadeError as err:
            raise SpeccascadeError(f"--eval-split {s.eval_split}: {err}") from None
    for flag, name in (("--base", s.base), ("--teacher", s.teacher)):
        if name is not None:
            check_model(name, flag)
    return _Plan(s, s.recipe(), resolve_precision(s.precision, s.accelerator))


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 autocast where the device computes in bf16 natively (CUDA, CPUs with AVX512-BF16/AMX), else float32."""
    if precision not in PRECISIONS:
        raise SpeccascadeError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def run(plan: _Plan) -> dict:
    """The finished fine-tune when ``--out`` holds it, else train, export and evaluate (under the directory's lock)."""
    out = plan.settings.out
    with locked(out, "finetune"):  # one writer: a second fine-tune into this --out is refused while this one runs
        done = _prepare_out(out, plan.recipe)
        if done is not None:
            say("finetune", f"{out} already holds this fine-tune; nothing to do")
        provenance = _finetune(plan) if done is None else done
    files = ", ".join([PROVENANCE, *(["heldout.json"] if "heldout" in provenance else [])])
    say("finetune", summary_line(provenance), wrote(out, note=f"a Hugging Face model directory; {files}"))
    return provenance


def _prepare_out(out: Path, recipe: dict) -> dict | None:
    """The finished run's provenance when ``out`` already holds this fine-tune; refuses another run's directory."""
    if (out / PROVENANCE).exists():
        done = read_json(out / PROVENANCE)
        if done.get("recipe") != recipe:
            raise SpeccascadeError(f"{out} holds a fine-tune with other settings; choose another --out")
        return done
    if (out / SETTINGS).exists():
        if read_json(out / SETTINGS) != recipe:
            raise SpeccascadeError(f"{out} holds an unfinished fine-tune with other settings; choose another --out or delete it")
    elif any(child.name != LOCK for child in out.iterdir()):
        raise SpeccascadeError(f"{out} exists and is not a fine-tune directory; choose an empty or new --out")
    return None


def _finetune(plan: _Plan) -> dict:
    """Train, export, evaluate held out, and record the provenance (under the directory's lock)."""
    s, out = plan.settings, plan.settings.out
    started = time.perf_counter()
    data_seen, run = _train(plan)
    provenance = {
        "format": "speccascade-finetune/1", "base": s.base, "task": s.task,
        "mode": "lora" if s.lora_rank > 0 else "full", "layers": s.layers, "teacher": s.teacher,
        "steps": s.steps, "data_seen": data_seen, "precision": plan.precision,
        "train_wall_s": round(time.perf_counter() - started, 1), "recipe": plan.recipe,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if s.eval_examples > 0:
        report = _heldout(s)
        write_json(out / "heldout.json", report)
        provenance["heldout"] = {k: v for k, v in report.items() if k != "records"}
    if run is not None:  # the held-out numbers join the run, which is closed so that the next one is new
        run.summary.update({"heldout_" + k: v for k, v in _flat(provenance.get("heldout", {})).items()})
        run.finish()
    write_json(out / PROVENANCE, provenance)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / SETTINGS).unlink(missing_ok=True)
    return provenance


def _train(plan: _Plan):
    """Fit (from the last checkpoint when one is there) and export the model; the examples seen and the W&B run."""
    s, out = plan.settings, plan.settings.out
    pl.seed_everything(s.seed, workers=True, verbose=False)
    module = FinetuneModule(s)
    context = getattr(module.model.config, "max_position_embeddings", None)
    if s.eval_examples and context and s.max_new_tokens >= context:  # refused before training, not after it
        raise SpeccascadeError(f"--max-new-tokens {s.max_new_tokens} does not fit the context of {module.base_id!r} "
                               f"({context} tokens), and the held-out evaluation decodes that many after each prompt")
    plain = module.model.get_base_model() if s.lora_rank > 0 else module.model
    pair = ModelPair(plain, plain, module.tokenizer, "finetune", module.base_id, module.base_id)
    module.model.train()  # the pair put it in eval mode
    data = FinetuneDataModule(pair, s.task, s.steps, s.batch_size, s.examples, s.pack_length, s.data_file, s.seed)
    data.setup()
    write_json(out / SETTINGS, plan.recipe)
    loggers = [CSVLogger(out, name="logs")]
    if s.wandb_mode != "disabled":
        loggers.append(WandbLogger(experiment=start_run(out, s.wandb_project, s.wandb_mode, "finetune", plan.recipe,
                                                        s.wandb_group)))
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=s.checkpoint_every, save_last=True,
                                  save_top_k=0, save_on_train_epoch_end=False)
    trainer = pl.Trainer(max_steps=s.steps, max_epochs=-1, precision=plan.precision, accelerator=s.accelerator, devices=1,
                         logger=loggers, callbacks=[checkpoints, TQDMProgressBar()], gradient_clip_val=1.0, log_every_n_steps=1,
                         enable_model_summary=False, num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1,
                         default_root_dir=str(out))
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None)
    export(module.model.cpu(), module.tokenizer, out)
    return data.seen(), loggers[-1].experiment if len(loggers) > 1 else None


def _heldout(s: FinetuneSettings) -> dict:
    """The exported model's held-out quality (and the teacher's, with their agreement), greedy."""
    out = str(s.out)
    model, tokenizer, _ = load_model(out, device="cuda" if torch.cuda.is_available() and s.accelerator != "cpu" else "cpu")
    reference = load_model(s.teacher, device=model.device)[0] if s.teacher else model
    pair = ModelPair(model, reference, tokenizer, "finetune", out, s.teacher or out)
    return heldout_report(pair, s.task, s.eval_split, s.eval_examples, s.max_new_tokens, s.eval_batch_size,
                          s.data_file, s.eval_seed, teacher=bool(s.teacher))


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
