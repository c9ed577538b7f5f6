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

from ..data.traces import check_readable, load_traces, read_manifest, source
from ..deferral import features as F
from ..deferral import rules as R
from ..deferral.spec import check_head
from ..errors import SpeccascadeError
from ..listing import split_list
from ..deferral.heads import fingerprint
from ..outdir import OutputDir, writable
from ..report import read_json, say, wrote
from ..settings import OutputSettings, TrackingSettings, as_config, resolve_groups, seed_setting, setting
from ..tracking import head_artifact, run_path, start_run, trace_artifact, use_artifact
from . import offline
from .offline import DEFAULT_RULES
from .report import comparison_text, log_comparison, write_comparison


@dataclass(kw_only=True)
class CompareSettings(TrackingSettings, OutputSettings):
    """Settings of ``compare`` (the tracking and output groups, then its own)."""

    traces: str = setting(help="a reference trace directory the heads never saw (for example GSM8K test when the heads "
                          "were trained on GSM8K train)")
    out: Path = setting(help="output directory (compare.json, compare.csv, summary.csv, compare.png, compare.md)")
    heads: list[str] | str | None = setting(None, "head directories written by train-deferral (a list, or comma-separated)")
    rules: str | None = setting(None, "rule families whose knob is swept (name or name:PARAM=VALUE, comma-separated; "
                                "default: every position and token rule but fly, kl at several tau, js and entropy, those "
                                "whose features the traces hold)")
    resamples: int = setting(1000, "bootstrap resamples of the examples (at most 20000: their counts are held in memory, "
                             "and more move no interval by a digit worth reporting)", low=10, high=20000)
    seed: int = seed_setting("seed of the resampling")

    def config(self, manifest: dict, head_dirs: list[str]) -> dict:
        """What the comparison depends on (the traces and heads by their fingerprints): another one in --out is refused."""
        return as_config(self, ("traces", "heads", "rules", "resamples", "seed")) | {
            "trace_fingerprint": manifest.get("fingerprint"), "head_fingerprints": [fingerprint(d) for d in head_dirs]}


@dataclass
class _Plan:
    """Resolved settings: the traces' manifest read, the heads loaded and checked, nothing written."""

    settings: CompareSettings
    head_dirs: list[str]
    learned: dict[str, R.Learned]
    rules: str
    manifest: dict
    out: OutputDir


def compare(traces: str, out: Path, **options) -> dict:
    """Compare heads with every rule on held-out reference traces: curves, gap closed, 95% intervals.

    ``options`` are the fields of :class:`CompareSettings` (the command line's flags); returns the comparison.
    """
    return run(resolve(CompareSettings(traces=traces, out=out, **options)))


def resolve(settings: CompareSettings) -> _Plan:
    """Check the settings, the output path, the traces' manifest, the heads (held out?) and the rules; write nothing."""
    s = resolve_groups(settings)
    writable(s.out)
    head_dirs = split_list(s.heads, "--heads") if s.heads is not None else []
    manifest = read_manifest(s.traces)
    check_readable(manifest, s.traces)
    learned = load_heads(head_dirs, manifest, s.traces)
    rules = s.rules if s.rules is not None else ",".join(offline.available(DEFAULT_RULES, load_traces(s.traces).column_names))
    for spec in split_list(rules, "--rules"):
        R.parse(spec).build()
    out = OutputDir(s.out, "compare", s.config(manifest, head_dirs), s.resume, s.overwrite, legacy=_legacy_marker)
    return _Plan(s, head_dirs, learned, rules, manifest, out.check())


def _legacy_marker(directory: Path) -> dict | None:
    """A comparison written before output directories had markers: refused as one of other settings (--overwrite)."""
    return {"command": "compare", "config": {}, "complete": True} if (directory / "compare.json").is_file() else None


def run(plan: _Plan) -> dict:
    """Judge every candidate, write the report, print its table and log the W&B run (under the directory's lock)."""
    with plan.out.claim():
        if plan.out.complete:
            say("compare", f"{plan.settings.out} holds this comparison; nothing to do")
            return read_json(plan.settings.out / "compare.json")
        result = _judge(plan)
        plan.out.finish()
    summarise(result, plan.settings.out)
    return result


def _judge(plan: _Plan) -> dict:
    """Score every candidate on the traces, write the report, print its table, log the W&B run."""
    s = plan.settings
    rules = [R.parse(spec).build() for spec in split_list(plan.rules, "--rules")]
    columns, example_ids = read_columns(s.traces, rules, plan.learned.values())
    result = offline.compare_columns(columns, example_ids, plan.rules, plan.learned, s.resamples, s.seed)
    result["traces"] = {"path": str(s.traces), **{k: plan.manifest.get(k) for k in ("task", "split", "drafter", "target",
                                                                                      "fingerprint")}}
    result["heads"] = {label: directory for label, directory in zip(plan.learned, plan.head_dirs)}
    write_comparison(s.out, result, "compare")
    print(comparison_text(result))
    if s.wandb_mode != "disabled":
        log_run(result, s.out, s, s.traces, plan.head_dirs)
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
    log_comparison(result, out, "compare", run)
    print(f"W&B run: {run_path(run)}")
    run.finish()


def load_heads(head_dirs: list[str], manifest: dict, traces: str) -> dict[str, R.Learned]:
    """Each head as a learned rule, labelled by its directory's name, refused when trained on these traces or
    unable to read them (:func:`~speccascade.deferral.spec.check_head`)."""
    learned, given = {}, source(traces, manifest)
    for directory in head_dirs:
        rule = R.parse(f"learned:{directory}").build()
        check_held_out(rule, manifest, directory)
        check_head(directory, rule.head.config(), given)
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
    wanted = {*offline.LOSS_COLUMNS, *(c for r in rules for c in r.columns),
              *(c for h in heads for c in h.columns)}
    missing = sorted(wanted - set(rows.column_names))
    if missing:
        hint = " (hidden states: log-traces --hidden-states both)" if set(missing) & set(F.HIDDEN_INPUTS) else ""
        raise SpeccascadeError(f"traces in {traces} lack columns {', '.join(missing)}{hint}; the comparison needs "
                               "--mode reference traces logged with this feature spec")
    table = rows.select_columns(sorted(wanted) + ["example_id"]).with_format("numpy")[:]
    columns = {name: torch.from_numpy(np.asarray(table[name], dtype=np.float32)) for name in sorted(wanted)}
    return columns, np.asarray(table["example_id"])
