"""``speccascade demo``: the whole pipeline on the embedded default, offline.

Log teacher-forced traces of the task-specialised SmolLM2 pair (``smollm2-135m-arithmetic``: fine-tuned on
first use, then cached) on the ``arithmetic`` task's train split, train an MLP deferral head on them, judge it
against every rule offline on teacher-forced traces of the held-out test split (with bootstrap intervals),
then decode held-out problems with the head, every fixed rule and the baselines, and print the quality-cost
table with 95% intervals. Every setting of the four steps is checked before the first starts. Re-running
continues from what is already in ``--out``: the traces resume, and the head and the evaluation continue
when their settings are unchanged and are redone otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .evaluation.compare import CompareSettings
from .evaluation.compare import resolve as resolve_comparison
from .evaluation.compare import run as compare
from .evaluation.evaluate import DEFAULT_MARGIN, EvaluateSettings
from .evaluation.evaluate import resolve as resolve_evaluation
from .evaluation.evaluate import run as evaluate
from .outdir import MARKER, OutputDir
from .settings import (EXAMPLES_HIGH, DecodingSettings, PairSettings, TrackingSettings, derived, resolve_groups,
                       seed_setting, setting)
from .tracing.log_traces import LogTracesSettings
from .tracing.log_traces import resolve as resolve_traces
from .tracing.log_traces import run as log_traces
from .training.train import TrainSettings
from .training.train import resolve as resolve_training
from .training.train import run as train


@dataclass(kw_only=True)
class DemoSettings(TrackingSettings, DecodingSettings, PairSettings):
    """Settings of ``demo`` (the shared groups, then its own)."""

    out: Path = setting(Path("runs/demo"), "output directory (traces/, head/, held-out-traces/, compare/, eval/); "
                        "a rerun continues what is there")
    models: str | None = setting("smollm2-135m-arithmetic-demo", "model-pair preset (smollm2-135m-arithmetic-demo, a "
                                 "shorter recipe of smollm2-135m-arithmetic, is built from the embedded weights on "
                                 "first use: no network needed)")
    task: str = setting("arithmetic", "task name (arithmetic is generated: no data needed)")
    train_examples: int = setting(128, "training examples whose traces are logged (train split)", low=1,
                                  high=EXAMPLES_HIGH)
    compare_examples: int = setting(64, "held-out examples (test split) whose teacher-forced traces judge the head "
                                    "offline", low=1, high=EXAMPLES_HIGH)
    eval_examples: int = setting(24, "held-out examples decoded per rule and knob (test split)", low=1, high=EXAMPLES_HIGH)
    rules: str = setting("always,drafter,diff:0.2,tokenv3:0.5",
                         "rules compared with the learned head (each name:value is one decode of the split)")
    max_new_tokens: int = setting(80, "new tokens per evaluated example", low=1)
    epochs: int = setting(30, "training epochs of the head (early stopping on validation)", low=1)
    margin: float = setting(DEFAULT_MARGIN, "non-inferiority margin of 'reaches the target's quality'", low=0.0)
    seed: int = seed_setting("seed of data, training and sampling")
    overwrite: bool = setting(False, "replace traces in --out that were logged with other settings")


@dataclass
class _Plan:
    settings: DemoSettings
    traces: object
    held_out: object
    head: TrainSettings
    out: OutputDir


def demo(**options) -> dict:
    """Log traces, train a deferral head and compare it with every fixed rule, end to end.

    ``options`` are the fields of :class:`DemoSettings` (the command line's flags); returns the evaluation's results.
    """
    return run(resolve(DemoSettings(**options)))


def _traces(s: DemoSettings, name: str, split: str, limit: int) -> LogTracesSettings:
    """Teacher-forced traces (the demo's --max-new-tokens is the evaluation's, not theirs)."""
    return derived(LogTracesSettings, s, ("max_new_tokens",), out=s.out / name, split=split, limit=limit, mode="reference",
                   resume=True)


def _evaluation(s: DemoSettings, rules: str) -> EvaluateSettings:
    return derived(EvaluateSettings, s, out=s.out / "eval", split="test", limit=s.eval_examples, rules=rules, resume=True,
                   overwrite=True)


STEPS = ("traces", "head", "held-out-traces", "compare", "eval")  # the steps' directories under --out


def _legacy_marker(directory: Path) -> dict | None:
    """A demo directory written before it had a marker of its own: it holds the steps' directories alone."""
    children = {child.name for child in directory.iterdir()}
    return {"command": "demo", "config": {}, "complete": False} if children <= set(STEPS) else None


def resolve(settings: DemoSettings) -> _Plan:
    """Check all four steps' settings before the first one starts (a bad rule must not cost a trained head)."""
    s = resolve_groups(settings)
    # the demo's own marker and lock: a rerun continues (each step checks its settings in its own directory)
    out = OutputDir(s.out, "demo", {}, resume=True, progress=(f"*/{MARKER}",), legacy=_legacy_marker).check()
    s.wandb_group = s.wandb_group or time.strftime("demo-%Y%m%d-%H%M%S")  # the four steps' runs, together in W&B
    traces = resolve_traces(_traces(s, "traces", "train", s.train_examples))
    held_out = resolve_traces(_traces(s, "held-out-traces", "test", s.compare_examples))
    head = derived(TrainSettings, s, traces=[str(s.out / "traces")], out=s.out / "head", head="mlp", batch_size=512,
                   resume=True, overwrite=True)
    resolve_groups(head)
    OutputDir(head.out, "train-deferral", {}, resume=True, overwrite=True).check()  # its settings are checked once the traces exist
    resolve_evaluation(_evaluation(s, s.rules))
    return _Plan(s, traces, held_out, head, out)


def run(plan: _Plan) -> dict:
    """The four steps under the directory's lock, each ending with what it did; evaluate's table and verdicts come last."""
    with plan.out.claim():
        plan.out.reopen()  # unfinished until every step is done again
        result = _steps(plan)
        plan.out.finish()
    print(f"demo: finished in {result['demo_wall_s'] / 60:.1f} minutes; every step's outputs under {plan.settings.out}")
    return result


def _steps(plan: _Plan) -> dict:
    """log-traces, train-deferral, log-traces and compare on held-out examples, evaluate."""
    s, out = plan.settings, plan.settings.out
    console = Console(width=max(Console().width, 110))
    started = time.perf_counter()
    console.rule(f"1/4 log-traces: {s.models} on {s.task} (train, {s.train_examples} examples, teacher-forced)")
    log_traces(plan.traces)
    console.rule("2/4 train-deferral: MLP head, gap regression, early stopping on validation")
    train(resolve_training(plan.head))
    console.rule(f"3/4 compare offline: the head against every rule on {s.compare_examples} held-out examples (test), 95% CIs")
    log_traces(plan.held_out)
    offline = compare(resolve_comparison(derived(CompareSettings, s, ("rules",), traces=str(out / "held-out-traces"),
                                                 out=out / "compare", heads=str(out / "head"), resume=True, overwrite=True)))
    console.rule(f"4/4 evaluate: {s.eval_examples} held-out examples (test) per rule and knob")
    result = evaluate(resolve_evaluation(_evaluation(s, f"{s.rules},learned:{out / 'head'}")))
    result["demo_wall_s"] = time.perf_counter() - started
    result["offline"] = {"best_rule": offline.get("best_rule"), "head": offline["candidates"]["head"]}
    return result
