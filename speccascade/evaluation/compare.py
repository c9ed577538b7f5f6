"""``speccascade compare``: judge learned heads against every fixed and training-free rule on held-out
reference traces, with 95% bootstrap intervals over examples (:mod:`speccascade.evaluation.offline`).

Writes ``compare.json`` (everything), ``compare.csv`` (budget curves with their bands),
``summary.csv`` (one row per rule or head), ``compare.png`` and ``compare.md``, and one
offline-first W&B run. ``train-deferral`` writes the same files for its validation rows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.traces import load_traces, read_manifest
from ..deferral import features as F
from ..deferral import rules as R
from ..errors import SpeccascadeError
from ..outdir import writable
from ..report import comparison_table, pyplot, save_figure, wandb_image, wandb_lines, wandb_table, write_csv, write_json
from ..report import say, wrote
from ..settings import TrackingSettings, resolve_groups, setting
from ..tracking import head_artifact, run_path, start_run, trace_artifact, use_artifact
from . import offline
from .offline import DEFAULT_RULES, GAP_FRACTIONS, RATES, interval


@dataclass(kw_only=True)
class CompareSettings(TrackingSettings):
    """Settings of ``compare`` (the tracking group, then its own)."""

    traces: str = setting(help="a reference trace directory the heads never saw (for example GSM8K test when the heads "
                          "were trained on GSM8K train)")
    out: Path = setting(help="output directory (compare.json, compare.csv, summary.csv, compare.png, compare.md)")
    heads: list[str] | str | None = setting(None, "head directories written by train-deferral (a list, or comma-separated)")
    rules: str | None = setting(None, "rule families whose knob is swept (name or name:PARAM=VALUE, comma-separated; "
                                "default: every position and token rule, kl at several tau, js and entropy, those whose "
                                "features the traces hold)")
    resamples: int = setting(1000, "bootstrap resamples of the examples", low=10)
    seed: int = setting(0, "seed of the resampling", low=0)


@dataclass
class _Plan:
    """Resolved settings: the traces' manifest read, the heads loaded and checked, nothing written."""

    settings: CompareSettings
    head_dirs: list[str]
    learned: dict[str, R.Learned]
    rules: str
    manifest: dict


def compare(traces: str, out: Path, **options) -> dict:
    """Compare heads with every rule on held-out reference traces: curves, gap closed, 95% intervals.

    ``options`` are the fields of :class:`CompareSettings` (the command line's flags); returns the comparison.
    """
    return run(resolve(CompareSettings(traces=traces, out=out, **options)))


def resolve(settings: CompareSettings) -> _Plan:
    """Check the settings, the output path, the traces' manifest, the heads (held out?) and the rules; write nothing."""
    s = resolve_groups(settings)
    writable(s.out)
    head_dirs = [h for h in (s.heads.split(",") if isinstance(s.heads, str) else s.heads or []) if h]
    manifest = read_manifest(s.traces)
    learned = load_heads(head_dirs, manifest)
    rules = s.rules if s.rules is not None else ",".join(offline.available(DEFAULT_RULES, load_traces(s.traces).column_names))
    for spec in R.split_specs(rules):
        R.parse(spec)
    return _Plan(s, head_dirs, learned, rules, manifest)


def run(plan: _Plan) -> dict:
    """Judge every candidate, write the report, print its table and log the W&B run."""
    s = plan.settings
    columns, example_ids = read_columns(s.traces, [R.parse(spec) for spec in R.split_specs(plan.rules)], plan.learned.values())
    result = offline.compare_columns(columns, example_ids, plan.rules, plan.learned, s.resamples, s.seed)
    result["traces"] = {"path": str(s.traces), **{k: plan.manifest.get(k) for k in ("task", "split", "drafter", "target",
                                                                                      "fingerprint")}}
    result["heads"] = {label: directory for label, directory in zip(plan.learned, plan.head_dirs)}
    write(s.out, result, "compare")
    print(table(result))
    if s.wandb_mode != "disabled":
        log_run(result, s.out, s, s.traces, plan.head_dirs)
    summarise(result, s.out)
    return result


def summarise(result: dict, out: Path) -> None:
    """The last lines: what was judged, the best rule (the heads' verdicts are the table's last lines) and the files."""
    best = result.get("best_rule")
    say("compare", f"{result['examples']} held-out examples, {result['rows']} positions; best rule (least deferral to "
        f"close 90% of the gap): {best if best else 'none (no rule judged)'}",
        wrote(*(out / name for name in ("compare.md", "compare.png", "compare.json", "compare.csv", "summary.csv"))))


def log_run(result: dict, out: Path, tracking: TrackingSettings, traces: str, head_dirs: list[str]) -> None:
    """One W&B run that uses the traces' and the heads' artifacts and holds the comparison."""
    run = start_run(out, tracking.wandb_project, tracking.wandb_mode, "compare",
                    {k: result.get(k) for k in ("traces", "heads", "resamples", "seed", "examples", "rows")},
                    tracking.wandb_group)
    for artifact in (trace_artifact(traces), *map(head_artifact, head_dirs)):
        use_artifact(run, artifact)
    log_to_wandb(result, out, "compare", run)
    print(f"W&B run: {run_path(run)}")
    run.finish()


def load_heads(head_dirs: list[str], manifest: dict) -> dict[str, R.Learned]:
    """Each head as a learned rule, labelled by its directory's name, refused when trained on these traces."""
    learned = {}
    for directory in head_dirs:
        rule = R.parse(f"learned:{directory}")
        check_held_out(rule, manifest, directory)
        learned[_unique(Path(directory).name, learned)] = rule
    return learned


def _unique(label: str, taken: dict) -> str:
    n, name = 1, label
    while name in taken:
        n += 1
        name = f"{label}-{n}"
    return name


def check_held_out(rule: R.Learned, manifest: dict, directory: str) -> None:
    """Refuse traces a head was trained on (same fingerprint, or the same task and split); warn for another pair."""
    config = manifest.get("config", {})
    for trained in rule.head.provenance.get("traces", []):
        same_data = trained.get("fingerprint") == manifest.get("fingerprint") or (
            trained.get("task") is not None and trained.get("task") == config.get("task")
            and trained.get("split") == config.get("split") and trained.get("data_file") == config.get("data_file"))
        if same_data:
            raise SpeccascadeError(
                f"head {directory} was trained on {trained.get('path')} ({trained.get('task')}/{trained.get('split')}); "
                "judge it on traces it never saw (another split)")
        if trained.get("target") and trained["target"] != manifest.get("target"):
            print(f"warning: head {directory} was trained on traces of {trained.get('target')}, "
                  f"these traces are of {manifest.get('target')}", file=sys.stderr)


def read_columns(traces: str, rules: list[R.Rule], heads) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The columns the rules, heads and losses read, as tensors, and each row's example id."""
    rows = load_traces(traces)
    wanted = {*offline.LOSS_COLUMNS, *(f for r in rules for f in r.features),
              *(f for h in heads for f in h.features if f != "alpha")}
    missing = sorted(wanted - set(rows.column_names))
    if missing:
        hint = " (hidden states: log-traces --hidden-states both)" if set(missing) & set(F.HIDDEN_INPUTS) else ""
        raise SpeccascadeError(f"traces in {traces} lack columns {', '.join(missing)}{hint}; the comparison needs "
                               "--mode reference traces logged with this feature spec")
    table = rows.select_columns(sorted(wanted) + ["example_id"]).with_format("numpy")[:]
    columns = {name: torch.from_numpy(np.asarray(table[name], dtype=np.float32)) for name in sorted(wanted)}
    return columns, np.asarray(table["example_id"])


def summary_rows(result: dict) -> list[dict]:
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


def point_rows(result: dict) -> list[dict]:
    """Every candidate's curve, one row per knob, keyed like evaluate's points: ``rule`` is the rule's name
    (``learned`` for a head, ``oracle``), ``candidate`` the family or head it belongs to."""
    rule = {label: {"head": "learned", "oracle": "oracle"}.get(c["kind"], label.partition(":")[0])
            for label, c in result["candidates"].items()}
    return [{"rule": rule[label], "knob": p["knob"], "candidate": label, "kind": c["kind"],
             "deferral_rate": p["deferral_rate"], "loss": p["loss"]}
            for label, c in result["candidates"].items() for p in c["points"]]


def write(out: Path, result: dict, stem: str) -> None:
    """``{stem}.json``, ``{stem}.csv`` (budget curves with bands), ``summary.csv``, ``{stem}.png``, ``{stem}.md``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result, indent=1, strict=False)
    curves = [{"candidate": label, "kind": c["kind"], "deferral_budget": r, "loss": loss, "loss_low": low, "loss_high": high}
              for label, c in result["candidates"].items()
              for r, loss, low, high in zip(RATES, c["budget"]["loss"], c["budget"]["low"], c["budget"]["high"])]
    write_csv(out / f"{stem}.csv", curves, ["candidate", "kind", "deferral_budget", "loss", "loss_low", "loss_high"])
    rows = summary_rows(result)
    write_csv(out / "summary.csv", rows, list(rows[0]))
    plot(result, out / f"{stem}.png")
    (out / f"{stem}.md").write_text(markdown(result, f"{stem}.png"))


def plot(result: dict, path: Path) -> Path:
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


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _fmt(d: dict, spec: str = ".3f") -> str:
    return "-" if np.isnan(d["estimate"]) else f"{interval(d):{spec}}"


def table(result: dict) -> str:
    """Plain-text table: rate to close each gap fraction and area, best first (by the 90% rate)."""
    order = sorted(result["candidates"].items(), key=lambda kv: offline._nan_last(kv[1]["rate_to_close"]["0.9"]["estimate"]))
    lines = [f"{'candidate':<22} " + " ".join(f"{'rate to close ' + format(f, '.0%'):>24}" for f in GAP_FRACTIONS)
             + f" {'area':>24}"]
    for label, c in order:
        cells = [_fmt(c["rate_to_close"][f"{f:g}"]) for f in GAP_FRACTIONS] + [_fmt(c["area"], ".4f")]
        lines.append(f"{label:<22} " + " ".join(f"{x:>24}" for x in cells))
    for label, c in result["candidates"].items():
        if "against_rules" in c:
            a = c["against_rules"]
            lines.append(f"{label}: {_fmt(a['reduction_at_0.9'], '.0%')} fewer deferrals than {a['best_rule']} to close 90% "
                         f"of the gap; from {offline.BAND[0]:.0%} to {offline.BAND[1]:.0%} deferred, at or below every "
                         f"rule's curve within its interval: {_yes(a['within_intervals_of_every_rule'])}, never "
                         f"significantly worse than any rule (paired): {_yes(a['never_worse_than_every_rule'])}")
    return "\n".join(lines)


def markdown(result: dict, image: str) -> str:
    t = result.get("traces", {})
    lines = [f"# Held-out offline comparison: {t.get('task', '')} {t.get('split', '')}".rstrip(), "",
             f"{result['examples']} examples, {result['rows']} positions; 95% intervals from {result['resamples']} "
             "bootstrap resamples of the examples. Loss of the emitted choice: keep every draft "
             f"{_fmt(result['loss_keep_all'], '.4f')}, defer every draft {_fmt(result['loss_defer_all'], '.4f')}."
             + ("" if result["gap"]["low"] > 0 else " The drafter is not significantly worse than the target here: "
                "the rates that close its gap mean little."), "",
             f"![comparison]({image})", "",
             "| candidate | kind | " + " | ".join(f"rate to close {f:.0%}" for f in GAP_FRACTIONS) + " | area |",
             "|---|---|" + "---|" * (len(GAP_FRACTIONS) + 1)]
    for label, c in sorted(result["candidates"].items(), key=lambda kv: offline._nan_last(kv[1]["rate_to_close"]["0.9"]["estimate"])):
        cells = [_fmt(c["rate_to_close"][f"{f:g}"]) for f in GAP_FRACTIONS] + [_fmt(c["area"], ".4f")]
        lines.append(f"| {label} | {c['kind']} | " + " | ".join(cells) + " |")
    for label, c in result["candidates"].items():
        if "against_rules" in c:
            a = c["against_rules"]
            above = [r for r, v in a["rules"].items() if not v["within_intervals"]]
            worse = [r for r, v in a["rules"].items() if not v["never_worse"]]
            band = f"between deferral rates {offline.BAND[0]} and {offline.BAND[1]}"
            lines += ["", f"**{label}** needs {_fmt(a['reduction_at_0.9'], '.0%')} fewer deferrals than the best rule "
                      f"({a['best_rule']}) to close 90% of the gap. "
                      + (f"Its curve is at or below every rule's curve (within that rule's 95% interval) {band}"
                         if not above else f"Its curve rises above the interval of {', '.join(above)} somewhere {band}")
                      + ("; no paired difference to a rule is significantly positive there." if not worse else
                         f"; paired differences to {', '.join(worse)} are significantly positive somewhere there "
                         f"(at most {max(a['rules'][r]['largest_difference'] for r in worse):.4f} in mean loss).")]
    return "\n".join(lines) + "\n"


def log_to_wandb(result: dict, out: Path, stem: str, run) -> None:
    """Into ``run``: the summary as a table, every curve point as a table keyed by rule and knob (joins evaluate's
    ``points``), the budget curves as a line chart, the plot, the 90% rates."""
    rows = summary_rows(result)
    run.log({f"{stem}_summary": wandb_table(rows, list(rows[0]))})
    points = point_rows(result)
    run.log({f"{stem}_points": comparison_table(points, list(points[0]))})
    curves = {label: (RATES.tolist(), c["budget"]["loss"]) for label, c in result["candidates"].items()}
    run.log({f"{stem}_budget_curves": wandb_lines(curves, "best loss within a deferral budget", "deferral budget")})
    run.log({f"{stem}_plot": wandb_image(out / f"{stem}.png")})
    run.summary.update({f"{stem}/{k}/rate_to_close_0.9": v["rate_to_close"]["0.9"]["estimate"]
                        for k, v in result["candidates"].items()})
