"""``speccascade evaluate``: decode a task's evaluation split under every requested rule and knob,
and compare quality against cost (algorithms.md section 7), in local files and in W&B."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..data.tasks import Example, get_task
from ..decoding import Autoregressive, Decoder, ModelPair, SequentialCascade, SpeculativeCascade, load_pair
from ..deferral import rules as R
from ..errors import SpeccascadeError
from ..tracking import resolve_wandb_mode
from .summary import pareto_front, summary

LEARNED_RATES = ("0.2", "0.4", "0.6", "0.8")  # a learned head's recommended thresholds swept


def configurations(spec: str, pair: ModelPair, block_size: int, temperature: float) -> list[tuple[str, str, float | None, Decoder]]:
    """``(rule, label, knob, decoder)`` for one comma-separated item of ``--rules``."""
    name, _, value = spec.strip().partition(":")
    kw = dict(temperature=temperature)
    if name in ("target", "drafter"):
        return [(name, f"{name} only", None, Autoregressive(pair, name, **kw))]
    if name in ("always", "exact"):
        return [("speculative", "speculative decoding", None, SpeculativeCascade(pair, R.AlwaysDefer(), block_size, **kw))]
    if name == "sequential":  # Chow in the token-level sequential cascade
        chows = [R.parse(f"chow:{value}")] if value else [R.Chow(alpha=k) for k in R.Chow.SWEEP]
        return [("sequential", f"sequential {c.spec}", c.alpha, SequentialCascade(pair, c, **kw)) for c in chows]
    if name == "learned":
        path, _, threshold = value.rpartition("@") if "@" in value else (value, "", "")
        rule = R.Learned.from_pretrained(path)
        _check_pair(rule, pair, path)
        points = rule.head.operating_points
        knobs = [float(threshold)] if threshold else [points[r] for r in LEARNED_RATES if r in points] or [rule.threshold]
        return [("learned", f"learned:{Path(path).name}@{k:.3g}", k,
                 SpeculativeCascade(pair, R.Learned(rule.head, k, rule.alpha), block_size, **kw)) for k in knobs]
    if name not in R.FIXED_RULES:
        raise SpeccascadeError(f"unknown rule {name!r}; known: target, drafter, sequential, learned:DIR, {', '.join(R.FIXED_RULES)}")
    chosen = [R.parse(spec)] if value else [R.from_name(name, k) for k in R.FIXED_RULES[name].SWEEP or (None,)]
    return [(name, r.spec, getattr(r, r.knob) if r.knob else None, SpeculativeCascade(pair, r, block_size, **kw)) for r in chosen]


def _check_pair(rule: R.Learned, pair: ModelPair, path: str) -> None:
    """Warn (not refuse) when a head was trained on traces of another model pair."""
    for trace in rule.head.provenance.get("traces", []):
        other_tokenizer = trace.get("tokenizer") and trace["tokenizer"] != pair.tokenizer_fingerprint
        other_target = trace.get("target") and trace["target"] != pair.target_id
        if other_tokenizer or other_target:
            print(f"warning: head {path} was trained on traces of {trace.get('drafter')} -> {trace.get('target')}, "
                  f"not this pair ({pair.drafter_id} -> {pair.target_id})", file=sys.stderr)
            return


def run(decoder: Decoder, pair: ModelPair, examples: list[Example], task, batch_size: int, max_new_tokens: int, seed: int) -> dict:
    """Decode every example; quality is the task metric's mean, costs are totals over batches."""
    totals = dict(quality=0.0, wall_s=0.0, target_calls=0, drafter_calls=0, new_tokens=0, decided=0,
                  deferrals=0, rejections=0, target_forwards=0)
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, mask = pair.encode([ex.prompt for ex in batch])
        out = decoder.generate(ids, mask, max_new_tokens=max_new_tokens, seed=[seed + start + i for i in range(len(batch))])
        texts = pair.decode(out.new_tokens)
        totals["quality"] += sum(task.score(text, ex) for text, ex in zip(texts, batch))
        for key in totals.keys() - {"quality"}:
            totals[key] += getattr(out.stats, key)
    n = len(examples)
    decided = totals["decided"]
    return {
        "quality": totals["quality"] / n,
        # the target alone always "defers", the drafter alone never does
        "deferral_rate": totals["deferrals"] / decided if decided else float(getattr(decoder, "which", "") == "target"),
        "rejection_rate": totals["rejections"] / decided if decided else 0.0,
        "target_calls": totals["target_calls"],
        "drafter_calls": totals["drafter_calls"],
        "tokens_per_target_call": totals["new_tokens"] / totals["target_calls"] if totals["target_calls"] else float("inf"),
        "new_tokens": totals["new_tokens"],
        "wall_s": totals["wall_s"],
    }


def evaluate(
    out: Path,
    models: str | None = "smollm2-135m",
    drafter: str | None = None,
    target: str | None = None,
    task: str = "arithmetic",
    data_file: str | None = None,
    split: str = "test",
    limit: int | None = 32,
    rules: str = "always,chow,diff,opt,tokenv3,lossy",
    block_size: int = 5,
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    few_shot: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    wandb_mode: str | None = None,
    wandb_project: str = "speccascade",
) -> dict:
    """Decode a task's evaluation split under every rule and knob; compare quality against cost.

    Args:
        out: output directory (results.json, results.csv, quality_vs_cost.png, report.md).
        models: model-pair preset; --drafter/--target hub ids or paths replace it.
        drafter: drafter hub id or path (with --target).
        target: target hub id or path.
        task: task name (arithmetic, gsm8k, summarisation, translation, qa).
        data_file: local JSONL/parquet file of the task's records instead of the hub dataset.
        split: evaluation split.
        limit: number of examples (all when null).
        rules: comma-separated rules: a fixed rule name sweeps its default knob grid, name:value runs
            one knob, learned:DIR sweeps the head's recommended thresholds (learned:DIR@T one),
            plus the baselines target, drafter, always (exact speculative decoding) and sequential.
        block_size: drafts per block (gamma).
        temperature: sampling temperature (0 = greedy), the same for every decoder.
        max_new_tokens: new tokens per example.
        few_shot: solved examples put in each prompt (tasks that support it).
        batch_size: examples decoded together.
        seed: sampling seed (example i uses seed + i).
        wandb_mode: offline, online or disabled (default: online only where credentials exist).
        wandb_project: W&B project name.
    """
    wandb_mode = resolve_wandb_mode(wandb_mode)
    examples = get_task(task).examples(split, limit=limit, data_file=data_file, seed=seed, few_shot=few_shot)
    the_task = get_task(task)
    pair = load_pair(models if not (drafter or target) else None, drafter=drafter, target=target)
    specs = ["target", *[s for s in rules.split(",") if s.strip() and s.strip() != "target"]]
    configs = [c for spec in specs for c in configurations(spec, pair, block_size, temperature)]
    points = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    started = time.perf_counter()
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task("evaluate", total=len(configs))
        for rule, label, knob, decoder in configs:
            progress.update(bar, description=f"evaluate {label}")
            points.append({"rule": rule, "label": label, "knob": knob, **run(decoder, pair, examples, the_task, batch_size, max_new_tokens, seed)})
            progress.advance(bar)
    target_point = points[0]
    for p in points:
        p["relative_latency"] = p["wall_s"] / target_point["wall_s"]
    by_rule: dict[str, list[dict]] = {}
    for p in points:
        by_rule.setdefault(p["rule"], []).append(p)
    result = {
        "settings": {"models": models, "drafter": pair.drafter_id, "target": pair.target_id, "task": task, "split": split,
                     "examples": len(examples), "block_size": block_size, "temperature": temperature,
                     "max_new_tokens": max_new_tokens, "seed": seed, "metric": the_task.metric},
        "target_quality": target_point["quality"],
        "points": points,
        "summary": {rule: summary(pts, target_point["quality"]) for rule, pts in by_rule.items()},
        "pareto": {rule: [p["label"] for p in pareto_front(pts)] for rule, pts in by_rule.items()},
        "wall_s": time.perf_counter() - started,
    }
    write_outputs(Path(out), result)
    if wandb_mode != "disabled":
        log_to_wandb(result, Path(out), wandb_mode, wandb_project)
    return result


def log_to_wandb(result: dict, out: Path, mode: str, project: str) -> None:
    """One run per evaluation: every (rule, knob) point as a table, and quality-cost line charts."""
    import wandb

    run = wandb.init(project=project, mode=mode, dir=str(out), job_type="evaluate", config=result["settings"])
    fields = ["rule", "label", "knob", "quality", "deferral_rate", "tokens_per_target_call", "relative_latency", "wall_s"]
    run.log({"points": wandb.Table(columns=fields, data=[[p[f] for f in fields] for p in result["points"]])})
    rules_seen = [r for r in dict.fromkeys(p["rule"] for p in result["points"])]
    for cost in ("deferral_rate", "tokens_per_target_call", "relative_latency"):
        pts = {r: sorted((p[cost], p["quality"]) for p in result["points"] if p["rule"] == r) for r in rules_seen}
        run.log({f"quality_vs_{cost}": wandb.plot.line_series(
            xs=[[x for x, _ in pts[r]] for r in rules_seen], ys=[[y for _, y in pts[r]] for r in rules_seen],
            keys=rules_seen, title=f"quality vs {cost.replace('_', ' ')}", xname=cost)})
    run.summary.update({"target_quality": result["target_quality"]})
    run.log({"quality_vs_cost": wandb.Image(str(out / "quality_vs_cost.png"))})
    run.finish()


def write_outputs(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    fields = ["rule", "label", "knob", "quality", "deferral_rate", "rejection_rate", "target_calls", "drafter_calls",
              "tokens_per_target_call", "new_tokens", "wall_s", "relative_latency"]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows([{k: p[k] for k in fields} for p in result["points"]])
    plot(result, out / "quality_vs_cost.png")
    (out / "report.md").write_text(report(result))


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    rules_seen = list(dict.fromkeys(p["rule"] for p in result["points"]))
    for ax, cost, name in ((axes[0], "deferral_rate", "deferral rate"), (axes[1], "relative_latency", "latency relative to the target")):
        for rule in rules_seen:
            pts = sorted((p[cost], p["quality"]) for p in result["points"] if p["rule"] == rule)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-" if len(pts) > 1 else "s", label=rule)
        ax.axhline(result["target_quality"], color="grey", linestyle="--", label="target quality")
        ax.set_xlabel(name)
        ax.set_ylabel(f"quality ({result['settings']['metric']})")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{result['settings']['task']}: quality against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# speccascade evaluate: {s['task']} ({s['split']}, {s['examples']} examples)",
        "",
        f"Drafter `{s['drafter']}`, target `{s['target']}`; gamma {s['block_size']}, temperature {s['temperature']}, "
        f"max {s['max_new_tokens']} new tokens, seed {s['seed']}. Target quality ({s['metric']}): {result['target_quality']:.3f}.",
        "",
        "![quality against cost](quality_vs_cost.png)",
        "",
        "| decoder | quality | deferral rate | tokens / target call | latency vs target |",
        "|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(f"| {p['label']} | {p['quality']:.3f} | {p['deferral_rate']:.2f} | {p['tokens_per_target_call']:.2f} | {p['relative_latency']:.2f}x |")
    lines += ["", "| rule | lowest latency at target quality | best quality within target latency |", "|---|---|---|"]
    for rule, v in result["summary"].items():
        low, best = v["lowest_latency_at_target_quality"], v["best_quality_within_target_latency"]
        lines.append(f"| {rule} | {'-' if low is None else f'{low:.2f}x'} | {'-' if best is None else f'{best:.3f}'} |")
    return "\n".join(lines) + "\n"
