"""What ``evaluate`` writes: results.json/.csv, the quality-cost plot with 95% error bars, report.md, and
one offline-first W&B run (written through :mod:`speccascade.report`); and what it (and the demo) prints last."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..report import by_rule, comparison_table, pyplot, save_figure, wandb_image, wandb_lines, write_csv, write_json
from ..report import say, wrote
from ..tracking import head_artifact, run_path, start_run, use_artifact
from .points import LENGTH_TOLERANCE, LOOPING

FIELDS = ["rule", "label", "knob", "quality", "quality_low", "quality_high", "difference", "difference_low",
          "difference_high", "non_inferior", "reaches_target", "deferral_rate", "rejection_rate", "target_calls",
          "drafter_calls", "target_calls_vs_exact", "target_calls_vs_exact_low", "target_calls_vs_exact_high",
          "drafter_calls_vs_exact", "drafter_calls_vs_exact_low", "drafter_calls_vs_exact_high",
          "tokens_per_target_call", "new_tokens", "wall_s", "relative_latency", "length_ratio",
          "length_ratio_low", "length_ratio_high", "repetition", "looping_rate", "guards", "records"]


def write_outputs(out: Path, result: dict) -> None:
    write_json(out / "results.json", result)
    write_csv(out / "results.csv", result["points"], FIELDS)
    plot(result, out / "quality_vs_cost.png")
    (out / "report.md").write_text(markdown(result))


def interval(p: dict, name: str, spec: str = ".3f", sign: str = "") -> str:
    """``0.500 [0.250, 0.750]``; ``-`` without an estimate."""
    if p[name] is None or p[name] != p[name]:
        return "-"
    low, high = p[f"{name}_low"], p[f"{name}_high"]
    return f"{p[name]:{sign}{spec}} [{low:{sign}{spec}}, {high:{sign}{spec}}]"


SPEED = ("speed: measured side by side (configurations in turns over the same prompts) by `speccascade bench`; "
         "see docs/speed.md")


def results_table(result: dict) -> Table:
    """The points' quality and cost with 95% intervals, as a rich table; no latency: the points are decoded one
    after another, so their wall times are not compared fairly (``bench`` times speed)."""
    s = result["settings"]
    table = Table(title=f"quality ({s['metric']}) against cost on {s['examples']} examples, target quality "
                        f"{result['target_quality']:.3f}; [95% intervals], difference paired with the target")
    for header in ("decoder", "quality", "vs target", "deferred", "tokens/call"):
        table.add_column(header, justify="left" if header == "decoder" else "right", no_wrap=True, min_width=len(header))
    for p in result["points"]:
        table.add_row(p["label"], interval(p, "quality"), interval(p, "difference", sign="+"), f"{p['deferral_rate']:.2f}",
                      f"{p['tokens_per_target_call']:.2f}")
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


def print_results(result: dict, out: Path) -> None:
    """On stdout: the table, each rule's verdict, where speed is measured, and the files written."""
    Console(width=max(Console().width, 110)).print(results_table(result))  # wide enough that no column is cut
    for line in [*summary_lines(result), SPEED]:
        print(line)
    say("evaluate", wrote(out / "report.md", out / "quality_vs_cost.png", out / "results.json", out / "results.csv"))


def plot(result: dict, path: Path) -> Path:
    """Quality against deferral rate and relative latency, each point with its 95% interval."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.5))
    for ax, cost, name in ((axes[0], "deferral_rate", "deferral rate"), (axes[1], "relative_latency", "latency relative to the target")):
        for rule, pts in by_rule(result["points"]).items():
            pts = sorted(pts, key=lambda p: p[cost])
            ys = [p["quality"] for p in pts]
            errors = [[y - p["quality_low"] for y, p in zip(ys, pts)], [p["quality_high"] - y for y, p in zip(ys, pts)]]
            ax.errorbar([p[cost] for p in pts], ys, yerr=errors, fmt="o-" if len(pts) > 1 else "s", capsize=3, label=rule)
        ax.axhline(result["target_quality"], color="grey", linestyle="--", label="target quality")
        ax.set_xlabel(name)
        ax.set_ylabel(f"quality ({result['settings']['metric']}), 95% intervals")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{result['settings']['task']}: quality against cost ({result['settings']['examples']} examples)")
    return save_figure(fig, path)


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# speccascade evaluate: {s['task']} ({s['split']}, {s['examples']} examples)",
        "",
        f"Drafter `{s['drafter']}`, target `{s['target']}`; gamma {s['block_size']}, temperature {s['temperature']}, "
        f"max {s['max_new_tokens']} new tokens, seed {s['seed']}. Target quality ({s['metric']}): {result['target_quality']:.3f}.",
        "",
        f"Intervals are 95% percentile-bootstrap intervals over the examples ({s['resamples']} resamples, the same for every "
        f"point, so differences are paired). A point *reaches the target's quality* when the interval of its paired "
        f"difference to the target lies above -{s['margin']:g} (non-inferiority margin) and no guard fires: replies "
        f"significantly more than {LENGTH_TOLERANCE:.0%} longer than the target's, or significantly more looping replies "
        f"(at least {LOOPING:.0%} of a reply's 4-grams repeated). *Target calls vs exact SD* is the point's calls of "
        f"the target over exact speculative decoding's on the same examples (a paired ratio; below 1 saves work). "
        f"Per-example records: `points/*.parquet`.",
        "",
        "*Latency vs target* is the wall time of sequential runs (one point decoded after another, not in turns over "
        "the same prompts), so other work on the machine moves it: speed is measured side by side by `speccascade bench`.",
        "",
        "![quality against cost](quality_vs_cost.png)",
        "",
        "| decoder | quality | difference to target | reaches target | deferral rate | tokens / target call | target calls vs exact SD "
        "| latency vs target | length vs target | looping |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        reached = "yes" if p["reaches_target"] else ("no: " + "; ".join(p["guards"]) if p["guards"] else "no")
        lines.append(f"| {p['label']} | {interval(p, 'quality')} | {interval(p, 'difference', sign='+')} | {reached} | "
                     f"{p['deferral_rate']:.2f} | {p['tokens_per_target_call']:.2f} | "
                     f"{interval(p, 'target_calls_vs_exact')} | {p['relative_latency']:.2f}x | "
                     f"{interval(p, 'length_ratio', '.2f')} | {p['looping_rate']:.0%} |")
    lines += ["", "| rule | lowest latency at target quality | best quality within target latency |", "|---|---|---|"]
    for rule, v in result["summary"].items():
        low, best = v["lowest_latency_at_target_quality"], v["best_quality_within_target_latency"]
        lines.append(f"| {rule} | {'-' if low is None else f'{low:.2f}x'} | {'-' if best is None else f'{best:.3f}'} |")
    return "\n".join(lines) + "\n"


def log_to_wandb(result: dict, out: Path, tracking, heads: list[str] = ()) -> None:
    """One run per evaluation, using the learned heads' ``model`` artifacts: every point (with its intervals)
    as a table keyed by rule and knob, quality-cost line charts per rule, the plot."""
    run = start_run(out, tracking.wandb_project, tracking.wandb_mode, "evaluate", result["settings"], tracking.wandb_group)
    for directory in heads:
        use_artifact(run, head_artifact(directory))
    run.log({"points": comparison_table(result["points"], [f for f in FIELDS if f not in ("guards", "records")])})
    groups = by_rule(result["points"])
    for cost in ("deferral_rate", "tokens_per_target_call", "relative_latency"):
        series = {rule: tuple(zip(*sorted((p[cost], p["quality"]) for p in pts))) for rule, pts in groups.items()}
        run.log({f"quality_vs_{cost}": wandb_lines(series, f"quality vs {cost.replace('_', ' ')}", cost)})
    run.summary.update({"target_quality": result["target_quality"]})
    run.log({"quality_vs_cost": wandb_image(out / "quality_vs_cost.png")})
    print(f"W&B run: {run_path(run)}")
    run.finish()
