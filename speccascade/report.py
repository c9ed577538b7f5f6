"""The one reporting layer: every command's plots, tables (CSV, JSON, text, Markdown, W&B) and line charts go
through here.

The commands decide *what* to report (:mod:`speccascade.evaluation.report` for ``evaluate``, the demo,
``compare`` and ``train-deferral``'s held-out comparison, :mod:`speccascade.training.calibration` for the
reliability diagram, :mod:`speccascade.bench`); this module decides *how*: matplotlib set up once
(headless), strict JSON, CSV rows, text and Markdown tables, points grouped by rule, W&B tables, line
series and images. Every JSON file the package writes goes through :func:`write_json` and is read back through
:func:`read_json`; the module imports nothing of the package but its error type, so any layer may use it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Iterable

from .errors import SpeccascadeError


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a part (rename is atomic)."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def json_text(value, indent: int | None = 2, sort_keys: bool = False) -> str:
    """``value`` as strict JSON (NaN and infinities become null); finite values give the text of
    ``json.dumps(value, indent=indent, sort_keys=sort_keys)``, so checksums of files written before stay valid."""
    return json.dumps(json_ready(value), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: Path, value, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``value`` as strict JSON (:func:`json_text`), written atomically."""
    write_atomic(Path(path), json_text(value, indent, sort_keys).encode())
    return Path(path)


def read_json(path: Path) -> dict:
    """A JSON object the package wrote; one that does not parse, or is no object, is a :class:`SpeccascadeError`
    naming the file (a missing file stays the caller's ``OSError``)."""
    try:
        value = json.loads(Path(path).read_bytes())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise damaged(path, err) from None
    if not isinstance(value, dict):
        raise damaged(path, f"a JSON object expected, got a {type(value).__name__}")
    return value


def damaged(path: Path | str, detail) -> SpeccascadeError:
    """The error of a file of the package's that cannot be read: ``FILE is damaged or not a speccascade file``."""
    return SpeccascadeError(f"{path} is damaged or not a speccascade file ({' '.join(str(detail).split())})")


def write_text(path: Path, text: str) -> Path:
    """A text report (Markdown), written atomically."""
    write_atomic(Path(path), text.encode())
    return Path(path)


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, a line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]


def text_table(header: list[str], rows: Iterable[list[str]], first: int, width: int) -> list[str]:
    """A plain-text table's lines: the first column left-aligned in ``first`` characters, the others
    right-aligned in ``width``."""
    return [f"{row[0]:<{first}} " + " ".join(f"{cell:>{width}}" for cell in row[1:]) for row in [header, *rows]]


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
