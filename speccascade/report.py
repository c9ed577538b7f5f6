"""The one reporting layer: every command's plots, tables (CSV, JSON, W&B) and line charts go through here.

The commands decide *what* to report (:mod:`speccascade.evaluation.report` for ``evaluate`` and the
demo, :mod:`speccascade.evaluation.compare` for ``compare`` and ``train-deferral``'s held-out
comparison, :mod:`speccascade.training.calibration` for the reliability diagram, :mod:`speccascade.bench`);
this module decides *how*: matplotlib set up once (headless), strict JSON, CSV rows, points grouped
by rule, W&B tables, line series and images.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

from .outdir import write_atomic


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def json_ready(value):
    """Strict JSON: a NaN or infinity (no interval, no target call) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json(path: Path, value, indent: int = 2, strict: bool = True) -> Path:
    """``value`` as JSON, written atomically; ``strict`` turns NaN and infinities into null."""
    text = json.dumps(json_ready(value), indent=indent, allow_nan=False) if strict else json.dumps(value, indent=indent)
    write_atomic(path, text.encode())
    return path


def write_csv(path: Path, rows: Iterable[dict], fields: list[str]) -> Path:
    """One CSV row per dict (keys ``fields``, in that order); lists become ``"; "``-joined text."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: "; ".join(map(str, row[k])) if isinstance(row[k], list) else row[k] for k in fields}
                         for row in rows)
    return path


def by_rule(points: list[dict]) -> dict[str, list[dict]]:
    """Points grouped by their ``rule``, rules in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p["rule"], []).append(p)
    return groups


def say(command: str, *lines: str) -> None:
    """A command's closing lines on stdout, each ``{command}: ...``: its key numbers, and last :func:`wrote`, so a
    run ends by saying what it did (also with W&B off)."""
    for line in lines:
        print(f"{command}: {line}", flush=True)


def wrote(*paths: Path | str, note: str = "") -> str:
    """``wrote A, B (note)``: the full paths of a command's outputs, to copy into the next command."""
    return "wrote " + ", ".join(map(str, paths)) + (f" ({note})" if note else "")


def wandb_table(rows: list[dict], columns: list[str]):
    """A W&B table of the rows' ``columns`` (NaN and infinities as empty cells)."""
    import wandb

    return wandb.Table(columns=columns, data=[[json_ready(row[c]) for c in columns] for row in rows])


KEYS = ("rule", "knob")  # the key columns of every comparison table: a rule family and its knob


def comparison_table(rows: list[dict], columns: list[str]):
    """A W&B table of decisions keyed by rule and knob (``rule``, ``knob`` first, then ``columns``): evaluate's
    decoded points and compare's offline curve points share the key, so the two tables join on it."""
    return wandb_table(rows, [*KEYS, *(c for c in columns if c not in KEYS)])


def wandb_lines(series: dict[str, tuple[list[float], list[float]]], title: str, xname: str):
    """One W&B line chart: a line per label, from its ``(xs, ys)``."""
    import wandb

    labels = list(series)
    return wandb.plot.line_series(xs=[list(series[k][0]) for k in labels], ys=[list(series[k][1]) for k in labels],
                                  keys=labels, title=title, xname=xname)


def wandb_image(path: Path):
    import wandb

    return wandb.Image(str(path))
