"""``speccascade evaluate``: decode a task's evaluation split under every requested rule and knob,
and compare quality against cost (algorithms.md section 7) with 95% bootstrap intervals over examples,
in local files and in W&B.

Each point (rule and knob) keeps per-example records (:mod:`speccascade.evaluation.points`) written
atomically as soon as it completes, and those of its batches so far while it decodes; ``--resume``
reuses the completed points of an interrupted (or finished) run, continues an interrupted point after
its last whole batch, and writes the same results files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..data.tasks import Example, Task
from ..data.tasks.base import conversation
from ..decoding import Autoregressive, Decoder, ModelPair, SequentialCascade, SpeculativeCascade
from ..decoding.stats import COUNTERS, DecodeStats
from ..deferral import rules as R
from ..deferral.heads import fingerprint
from ..errors import SpeccascadeError
from ..launch import launch
from ..listing import split_list
from ..outdir import OutputDir
from ..pairs import check_heads, load_settings_pair
from ..report import by_rule
from ..settings import (EXAMPLES_HIGH, BlockSettings, CategorySettings, DecodingSettings, LaunchSettings, OutputSettings,
                        PairSettings, TaskSettings, TrackingSettings, as_config, resolve_groups, seed_setting, setting)
from ..uncertainty import LEVEL, RESAMPLES, resample_weights
from ..version import __version__
from . import report
from .points import (TOTALS, Point, PointStore, by_category, calls_against, empty_records, records_path, repetition,
                     summarise)
from .summary import pareto_front, summary

LEARNED_RATES = (0.2, 0.4, 0.6, 0.8)  # the deferral rates whose recorded thresholds a learned head is swept at
# evaluate's names beside the rules (always, a rule, is exact speculative decoding too), each with the rule whose
# knob it takes (None: no knob)
BASELINES = {"target": None, "drafter": None, "exact": None, "sequential": R.Chow}
DEFAULT_MARGIN = 0.02


@dataclass(kw_only=True)
class EvaluateSettings(TrackingSettings, LaunchSettings, BlockSettings, DecodingSettings, CategorySettings, TaskSettings,
                       PairSettings, OutputSettings):
    """Settings of ``evaluate`` (the shared groups, then its own)."""

    split: str = setting("test", "evaluation split")
    limit: int | None = setting(32, "number of examples (all when null; of those of --categories and "
                                f"--limit-per-category when given; at most {EXAMPLES_HIGH})", low=1, high=EXAMPLES_HIGH)
    rules: str = setting("always,chow,diff,opt,tokenv3,lossy",
                         "comma-separated rules: a fixed rule name sweeps its default knob grid, name:value runs one knob, "
                         "learned:DIR sweeps the head's recommended thresholds (learned:DIR@T one), plus the baselines "
                         "target, drafter, always (exact speculative decoding) and sequential")
    margin: float = setting(DEFAULT_MARGIN, "non-inferiority margin in the task metric's units: a point reaches the target's "
                            "quality when the 95% interval of its paired difference to the target lies above -margin", low=0.0)
    seed: int = seed_setting("sampling seed (example i uses seed + i), task-generator seed and bootstrap seed")
    rows: int | None = setting(None, "rows decoding at once within a batch (default: all of it); fewer: the batch's waiting "
                               "examples take finished rows' places (continuous batching; the same replies, so --resume may "
                               "change it)", low=1)

    def config(self) -> dict:
        """What every point depends on; --resume with another config is refused (the rules may change)."""
        config = as_config(self, ("drafter", "target", "task", "data_file", "split", "limit", "few_shot", "block_size",
                                  "temperature", "max_new_tokens", "batch_size", "seed")) | self.pair_config()
        picked = {"categories": self.categories, "limit_per_category": self.limit_per_category}
        return config | self.block_config() | {k: v for k, v in picked.items() if v is not None}


@dataclass
class _Planned:
    """A point and the rule it decodes with (None for the autoregressive baselines)."""

    point: Point
    kind: str  # target, drafter, speculative, sequential or cascade
    rule: R.Rule | None


@dataclass
class _Plan:
    settings: EvaluateSettings
    task: Task
    examples: list[Example]
    points: list[_Planned]
    out: OutputDir


def evaluate(out, **options) -> dict:
    """Decode a task's evaluation split under every rule and knob; compare quality against cost with 95% intervals.

    ``options`` are the fields of :class:`EvaluateSettings` (the command line's flags); returns the results.
    """
    return run(resolve(EvaluateSettings(out=out, **options)))


def resolve(settings: EvaluateSettings) -> _Plan:
    """Check every setting and rule, read the task's examples and check the output directory; load no
    model (learned heads are small and load here, to be checked), write nothing."""
    s = resolve_groups(settings)
    points = plan_points(s.rules)
    task, examples = s.examples(s.seed, s.by_category if s.picks else None)
    out = OutputDir(s.out, "evaluate", s.config(), s.resume, s.overwrite,
                    progress=("points/*.json", "points/*.partial.parquet"))
    return _Plan(s, task, examples, points, out.check())


def plan_points(rules: str) -> list[_Planned]:
    """The points of ``--rules``, the target first; an empty list, a malformed rule or a point asked for
    twice is an error naming it."""
    items = split_list(rules, "--rules")
    planned = [p for item in ["target", *[i for i in items if i != "target"]] for p in _points(item)]
    labels = [p.point.label for p in planned]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise SpeccascadeError(f"--rules asks for {', '.join(twice)} more than once")
    return planned


def _points(item: str) -> list[_Planned]:
    spec = R.parse(item, BASELINES)
    if spec.name in ("target", "drafter"):
        return [_Planned(Point(spec.name, f"{spec.name} only", None, spec.name), spec.name, None)]
    if spec.name in ("always", "exact"):
        return [_Planned(Point("speculative", "speculative decoding", None, "speculative"), "speculative", None)]
    if spec.name == "sequential":  # Chow in the token-level sequential cascade
        chows = [R.Chow(alpha=k) for k in ([spec.knob] if spec.knob is not None else R.Chow.SWEEP)]
        return [_Planned(Point("sequential", f"sequential {c.spec}", c.alpha, f"sequential {c.spec}"), "sequential", c)
                for c in chows]
    rule = spec.build()
    if spec.name == "learned":
        return _learned_points(rule, spec)
    one = spec.knob is not None or spec.params  # name:PARAM=VALUE is one point, at the default knob
    chosen = [rule] if one else [R.from_name(spec.name, k) for k in rule.SWEEP or (None,)]
    return [_Planned(Point(spec.name, r.spec, getattr(r, r.knob) if r.knob else None, r.spec), "cascade", r) for r in chosen]


def _learned_points(rule: R.Learned, spec: R.Spec) -> list[_Planned]:
    """A head at the threshold given (``@T``), else at its recommended thresholds; keyed by its weights."""
    key = fingerprint(spec.head)
    recorded = rule.head.thresholds()
    swept = [recorded[r] for r in LEARNED_RATES if r in recorded] or [rule.threshold]
    knobs = [rule.threshold] if spec.knob is not None else swept
    return [_Planned(Point("learned", f"learned:{Path(spec.head).name}@{k:.3g}", k, f"learned:{key}@{k!r}"),
                     "cascade", R.Learned(rule.head, k, rule.alpha)) for k in knobs]


def _decoder(planned: _Planned, pair: ModelPair, s: EvaluateSettings) -> Decoder:
    kw = dict(temperature=s.temperature)
    if planned.kind in ("target", "drafter"):
        return Autoregressive(pair, planned.kind, **kw)
    if planned.kind == "sequential":
        return SequentialCascade(pair, planned.rule, **kw)
    rule = R.AlwaysDefer() if planned.kind == "speculative" else planned.rule
    return SpeculativeCascade(pair, rule, s.block_size, **s.block_options(), **kw)


def _check_pair(rule: R.Learned, pair: ModelPair) -> None:
    """Warn (not refuse) when a head was trained on traces of another model pair."""
    for trace in rule.head.provenance.get("traces", []):
        other_tokenizer = trace.get("tokenizer") and trace["tokenizer"] != pair.tokenizer_fingerprint
        other_target = trace.get("target") and trace["target"] != pair.target_id
        if other_tokenizer or other_target:
            print(f"warning: head {rule.head.provenance.get('path')} was trained on traces of {trace.get('drafter')} -> "
                  f"{trace.get('target')}, not this pair ({pair.drafter_id} -> {pair.target_id})", file=sys.stderr)
            return


def decode(decoder: Decoder, pair: ModelPair, examples: list[Example], task: Task, s: EvaluateSettings,
           done: Callable[[int], object] = lambda n: None, partial: tuple[dict, dict] | None = None,
           save: Callable[[dict, dict], object] = lambda records, totals: None,
           starts: Sequence[int] | None = None) -> tuple[dict, dict]:
    """Decode the batches of ``examples`` that begin at ``starts`` (default: all of them, in order): per-example
    records and the point's totals that are no per-example sums.

    A multi-turn example's record adds up its turns' counters; its score is the reply to its last turn's, its
    text every reply, a blank line between them. ``done`` is told how many examples each batch decoded (progress).
    ``partial``, the records and totals of the first whole batches (an interrupted run's), is continued with the
    batches an uninterrupted run would decode next (example ``i`` is decoded with seed ``seed + i`` in either
    case); ``save`` is given the records and totals after every batch but the last.
    """
    starts = range(0, len(examples), s.batch_size) if starts is None else starts
    records, totals = partial or (empty_records(), dict.fromkeys(TOTALS, 0))
    for n in range(-(-len(records["example_id"]) // s.batch_size), len(starts)):  # after the batches a partial run decoded
        start = starts[n]
        batch, stats = examples[start : start + s.batch_size], []
        replies, counters, tokens = _turns(decoder, pair, batch, [s.seed + start + i for i in range(len(batch))], s, stats)
        done(len(batch))
        for ex, texts, counts, reply_tokens in zip(batch, replies, counters, tokens):
            records["example_id"].append(ex.id)
            records["category"].append(ex.category)
            records["score"].append(float(task.score(texts[-1], ex)))
            for name in COUNTERS:
                records[name].append(counts[name])
            records["repetition"].append(repetition(reply_tokens))
            records["text"].append("\n\n".join(texts))
        batch_total = DecodeStats.merge(stats)
        totals = {name: totals[name] + getattr(batch_total, name) for name in TOTALS}
        if n + 1 < len(starts):
            save(records, totals)
    return records, totals


def _turns(decoder: Decoder, pair: ModelPair, batch: list[Example], seeds: list[int], s: EvaluateSettings,
           stats: list[DecodeStats]) -> tuple[list[list[str]], list[dict[str, int]], list[list[int]]]:
    """Decode a batch turn by turn, each later turn with the example's earlier replies in its context (Spec-Bench's
    multi-turn prompts): each example's replies, its counters summed over its turns and its reply tokens; every
    call's stats are appended to ``stats``."""
    replies: list[list[str]] = [[] for _ in batch]
    counters = [dict.fromkeys(COUNTERS, 0) for _ in batch]
    tokens: list[list[int]] = [[] for _ in batch]
    for turn in range(1 + max(len(ex.followups) for ex in batch)):
        rows = [i for i, ex in enumerate(batch) if turn <= len(ex.followups)]
        ids, mask = pair.encode([conversation(batch[i], replies[i]) for i in rows])
        out = decoder.generate(ids, mask, max_new_tokens=s.max_new_tokens, seed=[seeds[i] for i in rows], batch_size=s.rows)
        for i, text, row, new in zip(rows, pair.decode(out.new_tokens), out.stats.rows, out.new_tokens.tolist()):
            replies[i].append(text)
            counters[i] = {name: counters[i][name] + int(row[name]) for name in COUNTERS}
            tokens[i] += new[: row["new_tokens"]]
        stats.append(out.stats)
    return replies, counters, tokens


def run(plan: _Plan) -> dict:
    """Decode the points not yet complete, then summarise, report and log every point (in process 0; the others,
    with ``--devices`` > 1, decode their share of each point's batches and return an empty dict)."""
    s, out = plan.settings, Path(plan.settings.out)
    with plan.out.claim():
        fabric = launch(s.accelerator, s.devices, s.num_nodes)
        pair = load_settings_pair(s, device=fabric.device)
        check_heads((p.rule for p in plan.points), pair)
        for learned in {id(p.rule.head): p.rule for p in plan.points if isinstance(p.rule, R.Learned)}.values():
            _check_pair(learned, pair)
        done = _decode_points(plan, pair, PointStore(out), fabric)
        if fabric.global_rank != 0:
            plan.out.finish()
            return {}
        result = results(plan, done, pair)
        report.write_outputs(out, result)
        if s.wandb_mode != "disabled":
            heads = dict.fromkeys(p.rule.head.provenance["path"] for p in plan.points if isinstance(p.rule, R.Learned))
            report.log_to_wandb(result, out, s, heads=list(heads))
        plan.out.finish()
    report.print_results(result, out)
    return result


def _decode_points(plan: _Plan, pair: ModelPair, store: PointStore, fabric) -> list[tuple[Point, dict, dict]]:
    """Every point's records: loaded when an earlier run completed it, else decoded and saved at once. With several
    processes, process ``r`` of ``w`` decodes every ``w``-th batch from its ``r``-th (the same batches and seeds as
    one process), saves its share, and process 0 puts the shares together; only process 0 returns the records."""
    ids, size = [ex.id for ex in plan.examples], plan.settings.batch_size
    rank, world = fabric.global_rank, fabric.world_size
    shares = [range(0, len(ids), size)[r::world] for r in range(world)]  # the first example of each process's batches
    starts, mine = shares[rank], _batch_ids(ids, shares[rank], size)
    done = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=rank != 0) as progress:
        bar = progress.add_task("evaluate", total=len(plan.points))
        examples = progress.add_task("  examples" if world == 1 else "  examples of process 0", total=len(mine))
        for planned in plan.points:
            progress.update(bar, description=f"evaluate {planned.point.label}")
            progress.reset(examples)
            loaded = store.load(planned.point, ids)
            if loaded is None:
                point, decoder = planned.point, _decoder(planned, pair, plan.settings)
                partial = store.load_partial(point, mine, size, rank, world)
                if partial:
                    progress.update(examples, completed=len(partial[0]["example_id"]))
                share = decode(decoder, pair, plan.examples, plan.task, plan.settings, lambda n: progress.advance(examples, n),
                               partial, lambda records, totals: store.save_partial(point, records, totals, rank, world), starts)
                if world > 1:
                    store.save_partial(point, *share, rank, world)
                    fabric.barrier()
                    share = _gathered(store, point, shares, ids, size) if rank == 0 else share
                if rank == 0:
                    store.save(point, *share)
                    loaded = share
                fabric.barrier()
            if rank == 0:
                done.append((planned.point, *loaded))
            progress.advance(bar)
    return done


def _batch_ids(ids: list[str], starts: Sequence[int], size: int) -> list[str]:
    """The ids of the examples in the batches that begin at ``starts``, in order."""
    return [ids[i] for start in starts for i in range(start, min(start + size, len(ids)))]


def _gathered(store: PointStore, point: Point, starts: list[Sequence[int]], ids: list[str], size: int) -> tuple[dict, dict]:
    """One point's records in the examples' order, and its totals, from the shares every process saved (process
    ``r`` decoded the batches beginning at ``starts[r]``)."""
    world = len(starts)
    shares = [store.load_partial(point, _batch_ids(ids, mine, size), size, r, world) for r, mine in enumerate(starts)]
    if None in shares:
        raise SpeccascadeError(f"process {shares.index(None)} saved no share of point {point.label!r} in {store.dir}")
    records = empty_records()
    for n in range(sum(len(mine) for mine in starts)):  # batch n is the (n // world)-th of process n % world
        share = shares[n % world][0]
        first = (n // world) * size
        for name in records:
            records[name] += share[name][first : first + size]
    totals = {name: sum(share[1][name] for share in shares) for name in TOTALS}
    return records, totals


def results(plan: _Plan, done: list[tuple[Point, dict, dict]], pair: ModelPair) -> dict:
    """Every point's numbers with intervals (one set of bootstrap counts, so all comparisons are paired),
    per-rule Pareto fronts and summaries."""
    s = plan.settings
    weights = resample_weights(len(plan.examples), seed=s.seed)
    target = done[0][1]
    exact = next((records for point, records, _ in done if point.rule == "speculative"), None)
    points = [summarise(point, records, meta, target, weights, s.margin) | calls_against(records, exact, weights)
              | {"records": records_path(point), "categories": by_category(records, target, weights, s.margin)}
              for point, records, meta in done]
    for p in points:
        p["relative_latency"] = p["wall_s"] / points[0]["wall_s"] if points[0]["wall_s"] else float("nan")
    groups = by_rule(points)
    settings = {"models": s.preset, "drafter": pair.drafter_id, "target": pair.target_id, "task": s.task, "split": s.split,
                "examples": len(plan.examples), "block_size": s.block_size, "temperature": s.temperature,
                "max_new_tokens": s.max_new_tokens, "seed": s.seed, "metric": plan.task.metric, "margin": s.margin,
                "category_metrics": {c: plan.task.metric_of(c) for c in dict.fromkeys(ex.category for ex in plan.examples) if c},
                "level": LEVEL, "resamples": RESAMPLES, "speccascade_version": __version__}
    return {
        "settings": settings,
        "target_quality": points[0]["quality"],
        "points": points,
        "summary": {rule: summary(pts, points[0]["quality"]) for rule, pts in groups.items()},
        "pareto": {rule: [p["label"] for p in pareto_front(pts)] for rule, pts in groups.items()},
        "wall_s": sum(p["wall_s"] for p in points),
    }
