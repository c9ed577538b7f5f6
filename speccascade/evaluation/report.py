"""What ``evaluate`` writes (results.json/.csv, the quality-cost plot with 95% error bars, report.md, one
offline-first W&B run) and prints last (also for the demo), and what ``compare`` and ``train-deferral``'s held-out
comparison write (compare.json, the budget curves, the summary, the plot, the Markdown report, their W&B tables);
how is :mod:`speccascade.report`'s."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..report import (by_rule, comparison_table, markdown_table, pyplot, save_figure, say, text_table, wandb_image,
                      wandb_lines, wandb_table, write_csv, write_json, write_text, wrote)
from ..tracking import head_artifact, run_path, start_run, use_artifact
from . import offline
from .offline import GAP_FRACTIONS, RATES
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
    write_text(out / "report.md", markdown(result))


def interval_text(p: dict, name: str, spec: str = ".3f", sign: str = "") -> str:
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
        table.add_row(p["label"], interval_text(p, "quality"), interval_text(p, "difference", sign="+"),
                      f"{p['deferral_rate']:.2f}", f"{p['tokens_per_target_call']:.2f}")
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
                         f"of drafts ({lowest['label']}: difference {interval_text(lowest, 'difference', sign='+')})")
        else:
            best = max(pts, key=lambda p: p["quality"])
            guards = f"; {'; '.join(best['guards'])}" if best["guards"] else ""
            lines.append(f"{rule}: not shown to reach the target's quality; best {best['label']} quality "
                         f"{interval_text(best, 'quality')}, difference {interval_text(best, 'difference', sign='+')}{guards}")
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
        *markdown_table(["decoder", "quality", "difference to target", "reaches target", "deferral rate",
                         "tokens / target call", "target calls vs exact SD", "latency vs target", "length vs target",
                         "looping"], map(_point_cells, result["points"])),
        "",
        *markdown_table(["rule", "lowest latency at target quality", "best quality within target latency"],
                        [[rule, *_summary_cells(v)] for rule, v in result["summary"].items()]),
        *_category_lines(result),
    ]
    return "\n".join(lines) + "\n"


def category_rows(result: dict) -> list[dict]:
    """One row per point and category (spec-bench's; none for a task without categories), keyed by rule, knob
    and category: the category's metric, quality and paired difference to the target with 95% intervals."""
    metrics = result["settings"].get("category_metrics", {})
    return [{"rule": p["rule"], "knob": p["knob"], "label": p["label"], "category": category,
             "metric": metrics.get(category, "none"), **c} for p in result["points"] for category, c in p["categories"].items()]


def _category_lines(result: dict) -> list[str]:
    """report.md's per-category table: quality where the category has a reference, beside its tokens per call."""
    rows = category_rows(result)
    if not rows:
        return []
    return ["", f"Per category (quality where the category has a reference; intervals and paired differences on the "
            f"same resamples, restricted to the category's examples; reaches target: within -{result['settings']['margin']:g}):",
            "", *markdown_table(["decoder", "category", "metric", "examples", "quality", "difference to target",
                                 "reaches target", "tokens / target call"], map(_category_cells, rows))]


def _category_cells(r: dict) -> list[str]:
    """A point's row of report.md's per-category table (``-`` where the category is not scored)."""
    reaches = "-" if r["quality"] != r["quality"] else "yes" if r["non_inferior"] else "no"
    return [r["label"], r["category"], r["metric"], str(r["examples"]), interval_text(r, "quality"),
            interval_text(r, "difference", sign="+"), reaches, f"{r['tokens_per_target_call']:.2f}"]


def _point_cells(p: dict) -> list[str]:
    """A decoded point's row of report.md."""
    reached = "yes" if p["reaches_target"] else ("no: " + "; ".join(p["guards"]) if p["guards"] else "no")
    return [p["label"], interval_text(p, "quality"), interval_text(p, "difference", sign="+"), reached,
            f"{p['deferral_rate']:.2f}", f"{p['tokens_per_target_call']:.2f}", interval_text(p, "target_calls_vs_exact"),
            f"{p['relative_latency']:.2f}x", interval_text(p, "length_ratio", ".2f"), f"{p['looping_rate']:.0%}"]


def _summary_cells(v: dict) -> list[str]:
    """A rule's summary in report.md: its lowest latency at the target's quality, its best quality within the
    target's latency."""
    low, best = v["lowest_latency_at_target_quality"], v["best_quality_within_target_latency"]
    return ["-" if low is None else f"{low:.2f}x", "-" if best is None else f"{best:.3f}"]


def log_to_wandb(result: dict, out: Path, tracking, heads: list[str] = ()) -> None:
    """One run per evaluation, using the learned heads' ``model`` artifacts: every point (with its intervals)
    as a table keyed by rule and knob (and, for a task with categories, one keyed by rule, knob and category),
    quality-cost line charts per rule, the plot."""
    run = start_run(out, tracking.wandb_project, tracking.wandb_mode, "evaluate", result["settings"], tracking.wandb_group)
    for directory in heads:
        use_artifact(run, head_artifact(directory))
    run.log({"points": comparison_table(result["points"], [f for f in FIELDS if f not in ("guards", "records")])})
    categories = category_rows(result)
    if categories:  # keyed by rule, knob and category
        run.log({"categories": comparison_table(categories, list(categories[0]))})
    groups = by_rule(result["points"])
    for cost in ("deferral_rate", "tokens_per_target_call", "relative_latency"):
        series = {rule: tuple(zip(*sorted((p[cost], p["quality"]) for p in pts))) for rule, pts in groups.items()}
        run.log({f"quality_vs_{cost}": wandb_lines(series, f"quality vs {cost.replace('_', ' ')}", cost)})
    run.summary.update({"target_quality": result["target_quality"]})
    run.log({"quality_vs_cost": wandb_image(out / "quality_vs_cost.png")})
    print(f"W&B run: {run_path(run)}")
    run.finish()


def write_comparison(out: Path, result: dict, stem: str) -> None:
    """``{stem}.json``, ``{stem}.csv`` (budget curves with bands), ``summary.csv``, ``{stem}.png``, ``{stem}.md``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result, indent=1)
    curves = [{"candidate": label, "kind": c["kind"], "deferral_budget": r, "loss": loss, "loss_low": low, "loss_high": high}
              for label, c in result["candidates"].items()
              for r, loss, low, high in zip(RATES, c["budget"]["loss"], c["budget"]["low"], c["budget"]["high"])]
    write_csv(out / f"{stem}.csv", curves, ["candidate", "kind", "deferral_budget", "loss", "loss_low", "loss_high"])
    rows = comparison_summary_rows(result)
    write_csv(out / "summary.csv", rows, list(rows[0]))
    plot_comparison(result, out / f"{stem}.png")
    write_text(out / f"{stem}.md", comparison_markdown(result, f"{stem}.png"))


def comparison_summary_rows(result: dict) -> list[dict]:
    """One row per candidate: rates to close each gap fraction and the area, with their intervals."""
    out = []
    for label, c in result["candidates"].items():
        row = {"candidate": label, "kind": c["kind"]}
        for f in GAP_FRACTIONS:
            i = c["rate_to_close"][f"{f:g}"]
            row |= {f"rate_{f:g}": i["estimate"], f"rate_{f:g}_low": i["low"], f"rate_{f:g}_high": i["high"]}
        row |= {"area": c["area"]["estimate"], "area_low": c["area"]["low"], "area_high": c["area"]["high"]}
        out.append(row)
    return out


def comparison_point_rows(result: dict) -> list[dict]:
    """Every candidate's curve, one row per knob, keyed like evaluate's points: ``rule`` is the rule's name
    (``learned`` for a head, ``oracle``), ``candidate`` the family or head it belongs to."""
    rule = {label: {"head": "learned", "oracle": "oracle"}.get(c["kind"], label.partition(":")[0])
            for label, c in result["candidates"].items()}
    return [{"rule": rule[label], "knob": p["knob"], "candidate": label, "kind": c["kind"],
             "deferral_rate": p["deferral_rate"], "loss": p["loss"]}
            for label, c in result["candidates"].items() for p in c["points"]]


def plot_comparison(result: dict, path: Path) -> Path:
    """Best loss within each deferral budget, with 95% bands; heads bold, the oracle dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for label, c in result["candidates"].items():
        b = c["budget"]
        style = {"head": dict(linewidth=2.5), "oracle": dict(linestyle="--", color="black")}.get(c["kind"], dict(linewidth=1))
        line, = ax.plot(RATES, b["loss"], label=label, **style)
        ax.fill_between(RATES, b["low"], b["high"], color=line.get_color(), alpha=0.15 if c["kind"] != "rule" else 0.06)
    for name, key in (("keep every draft", "loss_keep_all"), ("defer every draft", "loss_defer_all")):
        ax.axhline(result[key]["estimate"], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("deferral budget (fraction of positions deferred)")
    ax.set_ylabel("mean loss of the emitted choice (lower is better)")
    ax.set_title(f"held-out comparison: {result['examples']} examples, {result['rows']} positions, 95% bands")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=110)


RATE_COLUMNS = [f"rate to close {f:.0%}" for f in GAP_FRACTIONS]  # a comparison table's columns, then "area"


def _estimate(d: dict, spec: str = ".3f") -> str:
    """``0.250 [0.200, 0.300]`` from an interval's JSON form; ``-`` without an estimate."""
    return "-" if math.isnan(d["estimate"]) else f"{offline.interval(d):{spec}}"


def _ranked(result: dict) -> list[tuple[str, dict]]:
    """The candidates, best first (by the rate that closes 90% of the gap; undefined rates last)."""
    return sorted(result["candidates"].items(), key=lambda kv: offline._nan_last(kv[1]["rate_to_close"]["0.9"]["estimate"]))


def _cells(c: dict) -> list[str]:
    """A candidate's row of every comparison table: the rate to close each gap fraction, then the area."""
    return [_estimate(c["rate_to_close"][f"{f:g}"]) for f in GAP_FRACTIONS] + [_estimate(c["area"], ".4f")]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def comparison_text(result: dict) -> str:
    """Plain-text table, best first, then each head's verdict against the rules."""
    lines = text_table(["candidate", *RATE_COLUMNS, "area"], [[label, *_cells(c)] for label, c in _ranked(result)], 22, 24)
    for label, c in result["candidates"].items():
        if "against_rules" in c:
            a = c["against_rules"]
            lines.append(f"{label}: {_estimate(a['reduction_at_0.9'], '.0%')} fewer deferrals than {a['best_rule']} to close "
                         f"90% of the gap; from {offline.BAND[0]:.0%} to {offline.BAND[1]:.0%} deferred, at or below every "
                         f"rule's curve within its interval: {_yes(a['within_intervals_of_every_rule'])}, never "
                         f"significantly worse than any rule (paired): {_yes(a['never_worse_than_every_rule'])}")
    return "\n".join(lines)


def comparison_markdown(result: dict, image: str) -> str:
    """The comparison's report: what was compared, the plot, the table (best first), each head's verdict."""
    t = result.get("traces", {})
    lines = [f"# Held-out offline comparison: {t.get('task', '')} {t.get('split', '')}".rstrip(), "",
             f"{result['examples']} examples, {result['rows']} positions; 95% intervals from {result['resamples']} "
             "bootstrap resamples of the examples. Loss of the emitted choice: keep every draft "
             f"{_estimate(result['loss_keep_all'], '.4f')}, defer every draft {_estimate(result['loss_defer_all'], '.4f')}."
             + ("" if result["gap"]["low"] > 0 else " The drafter is not significantly worse than the target here: "
                "the rates that close its gap mean little."), "",
             f"![comparison]({image})", "",
             *markdown_table(["candidate", "kind", *RATE_COLUMNS, "area"],
                             [[label, c["kind"], *_cells(c)] for label, c in _ranked(result)])]
    for label, c in result["candidates"].items():
        if "against_rules" in c:
            lines += ["", _verdict_markdown(label, c["against_rules"])]
    return "\n".join(lines) + "\n"


def _verdict_markdown(label: str, a: dict) -> str:
    """A head against the rules, in a sentence or three."""
    above = [r for r, v in a["rules"].items() if not v["within_intervals"]]
    worse = [r for r, v in a["rules"].items() if not v["never_worse"]]
    band = f"between deferral rates {offline.BAND[0]} and {offline.BAND[1]}"
    return (f"**{label}** needs {_estimate(a['reduction_at_0.9'], '.0%')} fewer deferrals than the best rule "
            f"({a['best_rule']}) to close 90% of the gap. "
            + (f"Its curve is at or below every rule's curve (within that rule's 95% interval) {band}"
               if not above else f"Its curve rises above the interval of {', '.join(above)} somewhere {band}")
            + ("; no paired difference to a rule is significantly positive there." if not worse else
               f"; paired differences to {', '.join(worse)} are significantly positive somewhere there "
               f"(at most {max(a['rules'][r]['largest_difference'] for r in worse):.4f} in mean loss)."))


def log_comparison(result: dict, out: Path, stem: str, run) -> None:
    """Into ``run``: the summary as a table, every curve point as a table keyed by rule and knob (joins evaluate's
    ``points``), the budget curves as a line chart, the plot, the 90% rates."""
    rows = comparison_summary_rows(result)
    run.log({f"{stem}_summary": wandb_table(rows, list(rows[0]))})
    points = comparison_point_rows(result)
    run.log({f"{stem}_points": comparison_table(points, list(points[0]))})
    curves = {label: (RATES.tolist(), c["budget"]["loss"]) for label, c in result["candidates"].items()}
    run.log({f"{stem}_budget_curves": wandb_lines(curves, "best loss within a deferral budget", "deferral budget")})
    run.log({f"{stem}_plot": wandb_image(out / f"{stem}.png")})
    run.summary.update({f"{stem}/{k}/rate_to_close_0.9": v["rate_to_close"]["0.9"]["estimate"]
                        for k, v in result["candidates"].items()})
