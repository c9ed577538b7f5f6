"""The points of an evaluation (one decoding of the split per rule and knob), their per-example
records, and what is concluded from them with uncertainty.

A point's records are one row per example: its id, the task's score, new tokens, the decoder's
counters (target and drafter calls, drafts, deferrals, ...), a repetition rate and the reply.
:class:`PointStore` keeps them as ``points/<label>-<key>.parquet`` beside results.json, written
under a temporary name and renamed, then committed by a sidecar ``.json`` (the point's summary
numbers), so a killed evaluation leaves only whole points and ``evaluate --resume`` skips them. A point
being decoded keeps the examples of its batches so far in ``points/<label>-<key>.partial.parquet``
(replaced atomically after each batch, its totals in the file's metadata, removed when the point
completes), from which ``--resume`` continues it.

:func:`summarise` turns records into a point's numbers: quality with its 95% bootstrap interval
over examples, the *paired* difference to the target (both resampled with the same example
counts), the decision "reaches the target's quality" (paired non-inferiority within a margin,
:func:`speccascade.uncertainty.non_inferior`), and two guards: mean output length
relative to the target's (length inflation) and the share of looping replies. :func:`calls_against`
puts a point's model calls against exact speculative decoding's on the same examples (a paired
ratio with its interval): the cost a cascade saves, free of timing noise under greedy decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.traces import read_parquet
from ..decoding.stats import COUNTERS, DecodeStats
from ..errors import SpeccascadeError
from ..report import read_json, write_json
from ..uncertainty import mean_interval, non_inferior, ratio_interval

POINTS = "points"
REPETITION_N = 4  # repetition = share of a reply's token 4-grams that already occurred earlier in it
LOOPING = 0.5  # a reply loops when at least half its 4-grams are repeats
LENGTH_TOLERANCE = 0.1  # length inflation: replies significantly more than 10% longer than the target's
TOTALS = ("wall_s", "target_forwards", "drafter_forwards")  # a point's totals that are no per-example sums
PARTIAL_META = b"speccascade.partial"  # the parquet metadata key of a partial point's key and totals


@dataclass(frozen=True)
class Point:
    """One decoding of the split: ``rule`` family, ``label`` shown in tables, ``knob``; ``key`` identifies
    what is decoded (a learned head's label includes its weights' fingerprint)."""

    rule: str
    label: str
    knob: float | None
    key: str

    @property
    def stem(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9.@=+-]+", "_", self.label)[:60]
        return f"{slug}-{hashlib.sha256(self.key.encode()).hexdigest()[:10]}"


def repetition(tokens: list[int], n: int = REPETITION_N) -> float:
    """Share of the reply's token n-grams that already occurred earlier in it (0 for replies shorter than n + 1)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


class PointStore:
    """Completed points of one evaluation directory: save atomically, load back (for --resume)."""

    def __init__(self, out: Path) -> None:
        self.dir = Path(out) / POINTS

    def save(self, point: Point, records: dict[str, list], meta: dict) -> None:
        """A completed point: its records, then the sidecar that commits them; its partial file goes."""
        path = self.dir / f"{point.stem}.parquet"
        self._write(pa.table(records), path)
        sidecar = {"key": point.key, "label": point.label, "examples": len(records["example_id"]), **meta}
        write_json(path.with_suffix(".json"), sidecar, indent=1)
        for partial in self.dir.glob(f"{point.stem}.*partial.parquet"):  # every process's, of any process count
            partial.unlink(missing_ok=True)

    def save_partial(self, point: Point, records: dict[str, list], totals: dict, rank: int = 0, world: int = 1) -> None:
        """The records of the batches process ``rank`` of ``world`` decoded so far of a point, with their totals,
        replacing the last ones."""
        meta = json.dumps({"key": point.key, **totals}).encode()
        self._write(pa.table(records).replace_schema_metadata({PARTIAL_META: meta}), self._partial(point, rank, world))

    def load_partial(self, point: Point, example_ids: list[str], batch_size: int, rank: int = 0,
                     world: int = 1) -> tuple[dict[str, list], dict] | None:
        """The records and totals of the whole batches an earlier run (process ``rank`` of ``world``) decoded of
        this point, when they are the first examples of ``example_ids`` (so the rest decode in the same batches),
        or all of them, else None."""
        try:
            table = read_parquet(self._partial(point, rank, world))
            meta = json.loads(table.schema.metadata[PARTIAL_META])
            key, totals = meta["key"], {name: meta[name] for name in TOTALS}
        except (OSError, SpeccascadeError, KeyError, TypeError, ValueError):  # none, or damaged: decoded from the start
            return None
        records = table.to_pydict()
        ids = records.get("example_id", [])
        if key != point.key or ids != example_ids[: len(ids)] or (len(ids) % batch_size and len(ids) < len(example_ids)):
            return None  # another point's, other examples, or a batch cut short
        return records, totals

    def _partial(self, point: Point, rank: int = 0, world: int = 1) -> Path:
        process = "" if world == 1 else f".rank{rank}-of-{world}"
        return self.dir / f"{point.stem}{process}.partial.parquet"

    def _write(self, table: pa.Table, path: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def load(self, point: Point, example_ids: list[str]) -> tuple[dict[str, np.ndarray], dict] | None:
        """The point's records and meta when it completed for exactly these examples, else None."""
        path = self.dir / f"{point.stem}.parquet"
        try:
            meta = read_json(path.with_suffix(".json"))
            records = {k: np.asarray(v) for k, v in read_parquet(path).to_pydict().items()}
        except (OSError, SpeccascadeError):  # missing or damaged: the point is decoded again
            return None
        if meta.get("key") != point.key or records.get("example_id", np.array([])).tolist() != example_ids:
            return None
        return records, meta


def records_path(point: Point) -> str:
    """Where a point's records are, relative to the evaluation directory."""
    return f"{POINTS}/{point.stem}.parquet"


def empty_records() -> dict[str, list]:
    return {"example_id": [], "category": [], "score": [], **{name: [] for name in COUNTERS}, "repetition": [], "text": []}


TEXT_COLUMNS = ("example_id", "category", "text")


def quality_against(score: np.ndarray, target: np.ndarray, weights: np.ndarray, margin: float) -> dict:
    """Quality with its interval, the paired difference to the target's and non-inferiority within ``margin``,
    over the examples that have a score (NaN: no reference to score against; all NaN without any)."""
    scored = np.isfinite(score) & np.isfinite(target)
    if not scored.any():
        nan = float("nan")
        return {"quality": nan, "quality_low": nan, "quality_high": nan, "difference": nan, "difference_low": nan,
                "difference_high": nan, "non_inferior": False}
    quality = mean_interval(score[scored], weights[:, scored])
    reaches, difference = non_inferior(score[scored], target[scored], margin, weights[:, scored])
    return {"quality": quality.estimate, "quality_low": quality.low, "quality_high": quality.high,
            "difference": difference.estimate, "difference_low": difference.low, "difference_high": difference.high,
            "non_inferior": reaches}


def summarise(point: Point, records: dict, meta: dict, target: dict, weights: np.ndarray, margin: float) -> dict:
    """A point's numbers from its records and the target's (same examples, same bootstrap counts); quality over
    the examples that have a score."""
    r = {k: np.asarray(v, dtype=float) for k, v in records.items() if k not in TEXT_COLUMNS}
    t = {k: np.asarray(v, dtype=float) for k, v in target.items() if k not in TEXT_COLUMNS}
    stats = DecodeStats(**{name: int(r[name].sum()) for name in COUNTERS})  # the rates are DecodeStats'
    quality = quality_against(r["score"], t["score"], weights, margin)
    length = ratio_interval(r["new_tokens"], t["new_tokens"], weights) if t["new_tokens"].sum() else None
    looping, target_looping = r["repetition"] >= LOOPING, t["repetition"] >= LOOPING
    more_looping = mean_interval(looping.astype(float) - target_looping.astype(float), weights)
    guards = []
    if length is not None and length.low > 1 + LENGTH_TOLERANCE:
        guards.append(f"replies {length.estimate:.2f}x as long as the target's")
    if more_looping.low > 0:
        guards.append(f"loops in {looping.mean():.0%} of replies (target {target_looping.mean():.0%})")
    return {
        "rule": point.rule, "label": point.label, "knob": point.knob, **quality,
        "guards": guards, "reaches_target": quality["non_inferior"] and not guards,
        "deferral_rate": stats.deferral_rate, "rejection_rate": stats.rejection_rate,
        "target_calls": stats.target_calls, "drafter_calls": stats.drafter_calls,
        "tokens_per_target_call": stats.tokens_per_target_call, "new_tokens": stats.new_tokens,
        "wall_s": float(meta["wall_s"]),
        "length_ratio": length.estimate if length else float("nan"),
        "length_ratio_low": length.low if length else float("nan"), "length_ratio_high": length.high if length else float("nan"),
        "repetition": float(r["repetition"].mean()), "looping_rate": float(looping.mean()),
    }


CALLS = ("target_calls", "drafter_calls")


def calls_against(records: dict, reference: dict | None, weights: np.ndarray) -> dict:
    """The point's target and drafter calls over ``reference``'s on the same examples, each a paired ratio of
    sums with its interval (``target_calls_vs_exact`` etc.; NaN without a reference or where it made no calls)."""
    out = {}
    for name in CALLS:
        key = f"{name}_vs_exact"
        if reference is None or not np.sum(reference[name]):
            out |= {key: float("nan"), f"{key}_low": float("nan"), f"{key}_high": float("nan")}
            continue
        ratio = ratio_interval(records[name], reference[name], weights)
        out |= {key: ratio.estimate, f"{key}_low": ratio.low, f"{key}_high": ratio.high}
    return out


def by_category(records: dict, target: dict, weights: np.ndarray, margin: float) -> dict[str, dict]:
    """Per category of the examples (spec-bench's; {} for a task without categories): quality, the paired
    difference to the target and non-inferiority (NaN where the category has no reference), tokens per target
    call and deferral rate, on the same bootstrap counts restricted to the category's examples."""
    categories = np.asarray(records.get("category", []), dtype=str)
    out = {}
    for category in dict.fromkeys(categories.tolist()) if categories.size and any(categories) else ():
        chosen = categories == category
        stats = DecodeStats(**{name: int(np.asarray(records[name])[chosen].sum()) for name in COUNTERS})
        score, target_score = (np.asarray(x["score"], dtype=float)[chosen] for x in (records, target))
        out[category] = {"examples": int(chosen.sum()), **quality_against(score, target_score, weights[:, chosen], margin),
                         "tokens_per_target_call": stats.tokens_per_target_call, "deferral_rate": stats.deferral_rate}
    return out
