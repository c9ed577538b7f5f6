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
from rich.table import Table

from ..data.log_traces import LogTracesSettings
from ..data.log_traces import resolve as resolve_traces
from ..data.log_traces import run as log_traces
from ..outdir import OutputDir
from ..settings import DecodingSettings, PairSettings, TrackingSettings, resolve_groups, setting
from ..training.train import TrainSettings
from ..training.train import resolve as resolve_training
from ..training.train import run as train
from .compare import compare
from .evaluate import DEFAULT_MARGIN, EvaluateSettings
from .evaluate import resolve as resolve_evaluation
from .evaluate import run as evaluate
from ..report import by_rule
from .report import interval


@dataclass(kw_only=True)
class DemoSettings(TrackingSettings, DecodingSettings, PairSettings):
    """Settings of ``demo`` (the shared groups, then its own)."""

    out: Path = setting(Path("runs/demo"), "output directory (traces/, head/, held-out-traces/, compare/, eval/); "
                        "a rerun continues what is there")
    models: str | None = setting("smollm2-135m-arithmetic-demo", "model-pair preset (smollm2-135m-arithmetic-demo, a "
                                 "shorter recipe of smollm2-135m-arithmetic, is built from the embedded weights on "
                                 "first use: no network needed)")
    task: str = setting("arithmetic", "task name (arithmetic is generated: no data needed)")
    train_examples: int = setting(128, "training examples whose traces are logged (train split)", low=1)
    compare_examples: int = setting(64, "held-out examples (test split) whose teacher-forced traces judge the head "
                                    "offline", low=1)
    eval_examples: int = setting(24, "held-out examples decoded per rule and knob (test split)", low=1)
    rules: str = setting("always,drafter,diff:0.2,tokenv3:0.5",
                         "rules compared with the learned head (each name:value is one decode of the split)")
    max_new_tokens: int = setting(80, "new tokens per evaluated example", low=1)
    epochs: int = setting(30, "training epochs of the head (early stopping on validation)", low=1)
    margin: float = setting(DEFAULT_MARGIN, "non-inferiority margin of 'reaches the target's quality'", low=0.0)
    seed: int = setting(0, "seed of data, training and sampling", low=0)
    overwrite: bool = setting(False, "replace traces in --out that were logged with other settings")


@dataclass
class _Plan:
    settings: DemoSettings
    traces: object
    held_out: object
    head: TrainSettings


def demo(**options) -> dict:
    """Log traces, train a deferral head and compare it with every fixed rule, end to end.

    ``options`` are the fields of :class:`DemoSettings` (the command line's flags); returns the evaluation's results.
    """
    return run(resolve(DemoSettings(**options)))


def _traces(s: DemoSettings, name: str, split: str, limit: int) -> LogTracesSettings:
    return LogTracesSettings(out=s.out / name, models=s.models, drafter=s.drafter, target=s.target, task=s.task,
                             split=split, limit=limit, mode="reference", block_size=s.block_size, seed=s.seed,
                             resume=True, overwrite=s.overwrite, **_tracking(s))


def _tracking(s: DemoSettings) -> dict:
    return {"wandb_mode": s.wandb_mode, "wandb_project": s.wandb_project, "wandb_group": s.wandb_group}


def _evaluation(s: DemoSettings, rules: str) -> EvaluateSettings:
    return EvaluateSettings(out=s.out / "eval", models=s.models, drafter=s.drafter, target=s.target, task=s.task,
                            split="test", limit=s.eval_examples, rules=rules, block_size=s.block_size,
                            temperature=s.temperature, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                            seed=s.seed, margin=s.margin, resume=True, overwrite=True, **_tracking(s))


def resolve(settings: DemoSettings) -> _Plan:
    """Check all four steps' settings before the first one starts (a bad rule must not cost a trained head)."""
    s = resolve_groups(settings)
    s.wandb_group = s.wandb_group or time.strftime("demo-%Y%m%d-%H%M%S")  # the four steps' runs, together in W&B
    traces = resolve_traces(_traces(s, "traces", "train", s.train_examples))
    held_out = resolve_traces(_traces(s, "held-out-traces", "test", s.compare_examples))
    head = TrainSettings(traces=[str(s.out / "traces")], out=s.out / "head", head="mlp", epochs=s.epochs, batch_size=512,
                         seed=s.seed, resume=True, overwrite=True, **_tracking(s))
    resolve_groups(head)
    OutputDir(head.out, "train-deferral", {}, resume=True, overwrite=True).check()  # its settings are checked once the traces exist
    resolve_evaluation(_evaluation(s, s.rules))
    return _Plan(s, traces, held_out, head)


def run(plan: _Plan) -> dict:
    s, out = plan.settings, plan.settings.out
    console = Console(width=max(Console().width, 110))
    started = time.perf_counter()
    console.rule(f"1/4 log-traces: {s.models} on {s.task} (train, {s.train_examples} examples, teacher-forced)")
    log_traces(plan.traces)
    console.rule("2/4 train-deferral: MLP head, gap regression, early stopping on validation")
    head = train(resolve_training(plan.head))
    console.print(f"validation AUROC {head.metrics['auroc']:.3f}" + (f", ECE {head.metrics['ece']:.3f}" if "ece" in head.metrics else ""))
    console.rule(f"3/4 compare offline: the head against every rule on {s.compare_examples} held-out examples (test), 95% CIs")
    log_traces(plan.held_out)
    offline = compare(str(out / "held-out-traces"), out / "compare", heads=str(out / "head"), seed=s.seed,
                      **_tracking(s))
    console.rule(f"4/4 evaluate: {s.eval_examples} held-out examples (test) per rule and knob")
    result = evaluate(resolve_evaluation(_evaluation(s, f"{s.rules},learned:{out / 'head'}")))
    result["demo_wall_s"] = time.perf_counter() - started
    result["offline"] = {"best_rule": offline.get("best_rule"), "head": offline["candidates"]["head"]}
    console.print(results_table(result))
    for line in summary_lines(result):
        console.print(line)
    against = result["offline"]["head"].get("against_rules")
    if against:
        reduction = against["reduction_at_0.9"]
        console.print(f"offline, held out: the head needs {reduction['estimate']:.0%} [{reduction['low']:.0%}, "
                      f"{reduction['high']:.0%}] fewer deferrals than {against['best_rule']} to close 90% of the gap")
    console.print(f"plot: {out / 'eval' / 'quality_vs_cost.png'}   report: {out / 'eval' / 'report.md'}")
    console.print(f"offline comparison: {out / 'compare' / 'compare.png'}   {out / 'compare' / 'compare.md'}")
    console.print(f"demo finished in {result['demo_wall_s'] / 60:.1f} minutes")
    return result


def results_table(result: dict) -> Table:
    s = result["settings"]
    table = Table(title=f"quality ({s['metric']}) against cost on {s['examples']} examples, target quality "
                        f"{result['target_quality']:.3f}; [95% intervals], difference paired with the target")
    for header in ("decoder", "quality", "vs target", "deferred", "tokens/call", "latency"):
        table.add_column(header, justify="left" if header == "decoder" else "right", no_wrap=True, min_width=len(header))
    for p in result["points"]:
        table.add_row(p["label"], interval(p, "quality"), interval(p, "difference", sign="+"), f"{p['deferral_rate']:.2f}",
                      f"{p['tokens_per_target_call']:.2f}", f"{p['relative_latency']:.2f}x")
    return table


def summary_lines(result: dict) -> list[str]:
    """Per rule: the deferral rate at which it reaches the target's quality (paired non-inferiority within the
    margin, no guard), or its best quality with intervals."""
    lines = []
    margin = result["settings"]["margin"]
    for rule, pts in by_rule(result["points"]).items():
        if rule == "target":
            continue
        reaching = [p for p in pts if p["reaches_target"]]
        if reaching:
            lowest = min(reaching, key=lambda p: p["deferral_rate"])
            lines.append(f"{rule}: reaches the target's quality (within {margin:g}) deferring {lowest['deferral_rate']:.2f} "
                         f"of drafts ({lowest['label']}: difference {interval(lowest, 'difference', sign='+')})")
        else:
            best = max(pts, key=lambda p: p["quality"])
            guards = f"; {'; '.join(best['guards'])}" if best["guards"] else ""
            lines.append(f"{rule}: not shown to reach the target's quality; best {best['label']} quality "
                         f"{interval(best, 'quality')}, difference {interval(best, 'difference', sign='+')}{guards}")
    return lines
