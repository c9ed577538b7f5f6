"""``speccascade demo``: the whole pipeline on the embedded default, offline.

Log teacher-forced traces of the task-specialised SmolLM2 pair (``smollm2-135m-arithmetic``: fine-tuned on
first use, then cached) on the ``arithmetic`` task's train split, train an
MLP deferral head on them, judge it against every rule offline on teacher-forced traces of the
held-out test split (with bootstrap intervals), then decode held-out problems with the head, every
fixed rule and the baselines, and print the quality-cost table. Re-running continues from what is
already in ``--out`` (traces resume; the head, comparison and evaluation are redone).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..data.log_traces import log_traces
from ..training.train import train_deferral
from .compare import compare
from .evaluate import evaluate


def demo(
    out: Path = Path("runs/demo"),
    models: str = "smollm2-135m-arithmetic",
    task: str = "arithmetic",
    train_examples: int = 256,
    compare_examples: int = 64,
    eval_examples: int = 32,
    rules: str = "always,drafter,chow:0.4,chow:0.7,diff:0,diff:0.2,opt:0,opt:1,tokenv3:0.5,tokenv3:0.9",
    block_size: int = 5,
    temperature: float = 0.0,
    max_new_tokens: int = 80,
    epochs: int = 30,
    seed: int = 0,
    wandb_mode: str | None = None,
) -> dict:
    """Log traces, train a deferral head and compare it with every fixed rule, end to end.

    Args:
        out: output directory (traces/, head/, eval/).
        models: model-pair preset (smollm2-135m-arithmetic is built from the embedded weights on first use:
            no network needed).
        task: task name (arithmetic is generated: no data needed).
        train_examples: training examples whose traces are logged (train split).
        compare_examples: held-out examples (test split) whose teacher-forced traces judge the head offline.
        eval_examples: held-out examples decoded per rule and knob (test split).
        rules: rules compared with the learned head (each name:value is one decode of the split).
        block_size: drafts per block (gamma).
        temperature: sampling temperature of the evaluation (0 = greedy).
        max_new_tokens: new tokens per evaluated example.
        epochs: training epochs of the head.
        seed: seed of data, training and sampling.
        wandb_mode: offline, online or disabled (default: online only where credentials exist).
    """
    console = Console(width=max(Console().width, 110))
    out = Path(out)
    started = time.perf_counter()
    console.rule(f"1/4 log-traces: {models} on {task} (train, {train_examples} examples, teacher-forced)")
    log_traces(out / "traces", models=models, task=task, split="train", limit=train_examples, mode="reference",
               block_size=block_size, seed=seed, resume=True)
    console.rule("2/4 train-deferral: MLP head, gap regression, early stopping on validation")
    head = train_deferral([str(out / "traces")], out / "head", head="mlp", epochs=epochs, batch_size=512, seed=seed,
                          wandb_mode=wandb_mode)
    console.print(f"validation AUROC {head.metrics['auroc']:.3f}" + (f", ECE {head.metrics['ece']:.3f}" if "ece" in head.metrics else ""))
    console.rule(f"3/4 compare offline: the head against every rule on {compare_examples} held-out examples (test), 95% CIs")
    log_traces(out / "held-out-traces", models=models, task=task, split="test", limit=compare_examples,
               mode="reference", block_size=block_size, seed=seed, resume=True)
    offline = compare(str(out / "held-out-traces"), out / "compare", heads=str(out / "head"), seed=seed,
                      wandb_mode=wandb_mode)
    console.rule(f"4/4 evaluate: {eval_examples} held-out examples (test) per rule and knob")
    result = evaluate(out / "eval", models=models, task=task, split="test", limit=eval_examples,
                      rules=f"{rules},learned:{out / 'head'}", block_size=block_size, temperature=temperature,
                      max_new_tokens=max_new_tokens, seed=seed, wandb_mode=wandb_mode)
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
    runs = sorted((out / "eval" / "wandb").glob("*run-*")) if (out / "eval" / "wandb").exists() else []
    if runs:
        console.print(f"W&B run: {runs[-1]}  (upload with `wandb sync {runs[-1]}`)")
    console.print(f"demo finished in {result['demo_wall_s'] / 60:.1f} minutes")
    return result


def results_table(result: dict) -> Table:
    table = Table(title=f"quality ({result['settings']['metric']}) against cost, target quality {result['target_quality']:.3f}")
    for header in ("decoder", "quality", "deferred", "tokens/call", "latency"):
        table.add_column(header, justify="left" if header == "decoder" else "right", no_wrap=True, min_width=len(header))
    for p in result["points"]:
        table.add_row(p["label"], f"{p['quality']:.3f}", f"{p['deferral_rate']:.2f}", f"{p['tokens_per_target_call']:.2f}",
                      f"{p['relative_latency']:.2f}x")
    return table


def summary_lines(result: dict) -> list[str]:
    """Per rule: the deferral rate it needs to reach the target's quality, or the best quality it reaches."""
    lines = []
    target = result["target_quality"]
    for rule in dict.fromkeys(p["rule"] for p in result["points"]):
        if rule == "target":
            continue
        pts = [p for p in result["points"] if p["rule"] == rule]
        matching = [p["deferral_rate"] for p in pts if p["quality"] >= target - 1e-9]
        if matching:
            lines.append(f"{rule}: reaches the target's quality deferring {min(matching):.2f} of drafts")
        else:
            lines.append(f"{rule}: best quality {max(p['quality'] for p in pts):.3f} (target {target:.3f})")
    return lines
