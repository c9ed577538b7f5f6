"""The bench's report: one row per configuration (rates from :class:`~speccascade.decoding.DecodeStats`),
the derived numbers of docs/algorithms.md section 7, the goals, and the markdown table."""

from __future__ import annotations

import math
import platform
import statistics
from dataclasses import replace

import numpy as np
import torch
import transformers

from ..data.tasks import Example
from ..data.tasks.spec_bench import CATEGORIES
from ..decoding import ModelPair
from ..uncertainty import Interval, percentile_interval, ratio, resample_weights
from .measure import ASSISTED_ADAPTIVE, Configuration, exact_name

GOALS = {
    "exact_sd_vs_assisted": ("exact speculative decoding / transformers assisted generation, batch 1", 1.2),
    "efficiency": ("measured / ideal speed-up of exact speculative decoding, batch 1", 0.85),
    "batch8_vs_batch1": ("exact speculative decoding throughput, batch 8 / batch 1", 2.0),
    "overhead": ("share of exact-SD wall time outside the models' forward passes (at most)", 0.10),
}
ROW_RATES = {"tokens_per_target_call": "tokens_per_target_call", "acceptance": "acceptance_rate", "deferral_rate": "deferral_rate"}


def row(c: Configuration) -> dict:
    """A configuration's numbers: tokens/s over its median round and the decoder's rates (None where undefined)."""
    stats = replace(c.stats, wall_s=statistics.median(c.seconds))
    rates = {key: getattr(stats, name) for key, name in ROW_RATES.items()}
    return {"name": c.name, "implementation": c.implementation, "batch_size": c.batch_size,
            "tokens_per_s": stats.tokens_per_s, "seconds": c.seconds, "batch_seconds": c.batch_seconds,
            "batch_tokens": c.batch_tokens, "new_tokens": stats.new_tokens,
            "peak_memory_mib": c.peak_mib, "forward_share": c.forward_share, "overhead_share": 1 - c.forward_share,
            "split_ms": c.split_ms,
            **{key: value if math.isfinite(value) else None for key, value in rates.items()}}


def report(configs: list[Configuration], steps: dict[str, float], pair: ModelPair, settings: dict) -> dict:
    """Every configuration's row, the cost ratio, the ideal speed-up and the goals, with the settings that produced them."""
    rows = [row(c) for c in configs]
    by_name = {(r["name"], r["batch_size"]): r for r in rows}
    target = by_name[("target alone", 1)]
    for r in rows:
        r["speedup_vs_target"] = r["tokens_per_s"] / target["tokens_per_s"]
    single = {c.name: c for c in configs if c.batch_size == 1}
    weights = resample_weights(len(single["target alone"].batch_tokens))
    exact = single[exact_name(settings["draft_stop"])]
    for r, c in zip(rows, configs):
        interval = speedup_interval(c, single["target alone"], weights) if c.batch_size == 1 else None
        r["speedup_vs_target_ci"] = None if interval is None else interval.as_dict()
        if c.name.startswith("cascade "):  # the cascades' goal: faster than exact decoding with the same blocks
            r["speedup_vs_exact_sd_ci"] = speedup_interval(c, exact, weights).as_dict()

    c = steps["drafter"] / steps["target"]
    sd1 = by_name[("exact speculative decoding", 1)]
    a = sd1["acceptance"] or 0.0
    ideal = ideal_speedup(a, settings["block_size"], c)
    ratios = {"efficiency": sd1["speedup_vs_target"] / ideal, "overhead": 1 - sd1["forward_share"]}
    if ("assisted generation", 1) in by_name:
        ratios["exact_sd_vs_assisted"] = sd1["tokens_per_s"] / by_name[("assisted generation", 1)]["tokens_per_s"]
    if ("exact speculative decoding", 8) in by_name:
        ratios["batch8_vs_batch1"] = by_name[("exact speculative decoding", 8)]["tokens_per_s"] / sd1["tokens_per_s"]
    goals = {k: {"what": GOALS[k][0], "value": ratios[k], "goal": GOALS[k][1],
                 "met": ratios[k] <= GOALS[k][1] if k == "overhead" else ratios[k] >= GOALS[k][1]}
             for k in GOALS if k in ratios}
    return {
        "pair": pair.name, "drafter": pair.drafter_id, "target": pair.target_id, "device": device_name(pair.device),
        "dtype": str(pair.target.dtype).removeprefix("torch."), **settings,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cost_ratio_c": c, "step_ms": {k: 1000 * v for k, v in steps.items()},
        "verify_cost": steps["verify"] / steps["target"], "acceptance_batch1": a, "ideal_speedup": ideal, "goals": goals,
        "results": rows,
    }


def speedup_interval(config: Configuration, base: Configuration, weights: np.ndarray) -> Interval:
    """Tokens/s of a batch-1 configuration over the base's, with a 95% bootstrap interval over prompts.

    Each prompt's time is its median over the timed rounds; a resample draws prompts with replacement
    and recomputes both sides' tokens/s on the same draw (paired), so the interval says how much the
    ratio depends on which prompts were decoded, and round-to-round noise is damped by the median.
    """
    return paired_speedup(per_prompt(config), per_prompt(base), weights)


def per_prompt(c: Configuration) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's (batch's) new tokens and its median wall time over the timed rounds."""
    return np.asarray(c.batch_tokens, float), np.median(np.asarray(c.batch_seconds, float), axis=0)


def paired_speedup(timed: tuple[np.ndarray, np.ndarray], base: tuple[np.ndarray, np.ndarray], weights: np.ndarray) -> Interval:
    """Tokens/s of ``timed`` over ``base`` (each per-prompt tokens and seconds), both resampled with ``weights``."""
    (tokens, seconds), (base_tokens, base_seconds) = timed, base
    estimate = ratio(tokens, seconds) / ratio(base_tokens, base_seconds)
    return percentile_interval(estimate, ratio(tokens, seconds, weights) / ratio(base_tokens, base_seconds, weights))


def ideal_speedup(a: float, gamma: int, c: float) -> float:
    """docs/algorithms.md section 7: ``(1 - a^(gamma+1)) / ((1 - a)(gamma c + 1))``."""
    tokens = gamma + 1 if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)
    return tokens / (gamma * c + 1)


def step_split(results: list[dict]) -> list[str]:
    """Where each configuration's time goes, per decoder step (one profiled run timing both models' forwards)."""
    lines = ["", "Time per decoder step (a block; a token for single-model rows), from one more run timing both "
             "models' forwards:", "", "| configuration | batch | drafter forwards ms | target forward ms | rest ms | outside forwards |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ms = r["split_ms"]
        lines.append(f"| {r['name']} | {r['batch_size']} | {ms['drafter']:.3f} | {ms['target']:.3f} | {ms['rest']:.3f} | "
                     f"{r['overhead_share']:.2f} |")
    return lines


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(report: dict) -> str:
    """The report as a readable table plus the goals."""
    lines = [
        f"# speccascade bench: {report['pair']} on {report['device']}",
        "",
        f"drafter {report['drafter']}, target {report['target']}, {report['dtype']}, gamma {report['block_size']}, "
        f"greedy, {report['prompts']} prompts x {report['max_new_tokens']} new tokens, median of {report['repeats']} "
        f"rounds (a batch-1 row's interval resamples prompts, each timed by its median round); cascades' bonus from "
        f"{report['bonus']}, drafts stop below {report['draft_stop']:g}; "
        f"cache {report['cache']}, compile {report['compile']}; torch {report['torch']}, "
        f"transformers {report['transformers']}.",
        "",
        "| configuration | implementation | batch | tokens/s | vs target alone | 95% CI over prompts | tokens/target call | acceptance | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        tpc, acc, ci = r["tokens_per_target_call"], r["acceptance"], r["speedup_vs_target_ci"]
        interval = "" if ci is None else f"[{ci['low']:.2f}, {ci['high']:.2f}]"
        lines.append(
            f"| {r['name']} | {r['implementation']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | "
            f"{r['speedup_vs_target']:.2f}x | {interval} | "
            f"{'' if tpc is None else f'{tpc:.2f}'} | {'' if acc is None else f'{acc:.2f}'} | {r['peak_memory_mib']:.0f} |"
        )
    lines += [
        "",
        f"cost ratio c = {report['cost_ratio_c']:.2f} (drafter step {report['step_ms']['drafter']:.1f} ms, target step "
        f"{report['step_ms']['target']:.1f} ms; a verify of gamma + 1 tokens costs {report['verify_cost']:.2f} target "
        f"steps), acceptance a = {report['acceptance_batch1']:.2f}, ideal speed-up {report['ideal_speedup']:.2f}x.",
        "",
        "| goal | measured | target | met |",
        "|---|---:|---:|---|",
    ]
    for g in report["goals"].values():
        sign = "<=" if g["what"].endswith("(at most)") else ">="
        lines.append(f"| {g['what']} | {g['value']:.2f} | {sign} {g['goal']} | {'yes' if g['met'] else 'no'} |")
    lines += step_split(report["results"])
    cascades = [r for r in report["results"] if "speedup_vs_exact_sd_ci" in r]
    if cascades:
        lines += ["", f"Cascades against {exact_name(report['draft_stop'])} (batch 1, paired over prompts, 95% CI):", ""]
        for r in cascades:
            ci = r["speedup_vs_exact_sd_ci"]
            lines.append(f"- {r['name']}: {ci['estimate']:.2f}x [{ci['low']:.2f}, {ci['high']:.2f}]")
    return "\n".join(lines) + "\n"


SPEC_BENCH_GOAL = ("exact speculative decoding / transformers assisted generation, batch 1, in every category", 1.2)


def spec_bench(configs: list[Configuration], examples: list[Example], owners: list[int], draft_stop: float) -> dict:
    """Spec-Bench's table: each batch-1 configuration's speed-up over the target alone per category and overall,
    with 95% bootstrap intervals over that category's prompts (a prompt's turns timed together, by their median
    rounds), and its mean accepted tokens per target call; then the paired ratios the goals read (exact decoding
    over assisted generation, each cascade over exact decoding with the same blocks), per category; and a record
    per prompt and configuration (its id, category, turns, new tokens and seconds).

    ``owners`` holds the index in ``examples`` of each decoded turn.
    """
    single = {c.name: c for c in configs if c.batch_size == 1}
    names = np.asarray([e.category for e in examples])
    groups = {c: np.flatnonzero(names == c) for c in CATEGORIES if c in names} | {"overall": np.arange(len(names))}
    weights = {g: resample_weights(len(idx)) for g, idx in groups.items()}
    sums = {}
    for name, c in single.items():
        tokens, seconds = per_prompt(c)
        sums[name] = (np.bincount(owners, tokens, len(names)), np.bincount(owners, seconds, len(names)))

    def over(name: str, base: str) -> dict:
        return {g: paired_speedup(tuple(a[idx] for a in sums[name]), tuple(a[idx] for a in sums[base]),
                                  weights[g]).as_dict() for g, idx in groups.items()}

    exact = exact_name(draft_stop)
    rows = [{"name": name, "speedup": over(name, "target alone"), "tokens_per_target_call":
             c.stats.tokens_per_target_call if math.isfinite(c.stats.tokens_per_target_call) else None}
            for name, c in single.items()]
    ratios = [{"name": f"{name} / {exact}", **({"speedup": over(name, exact)})}
              for name in single if name.startswith("cascade ")]
    goal = None
    if "assisted generation" in single:
        ratios.insert(0, {"name": "exact speculative decoding / assisted generation",
                          "speedup": over("exact speculative decoding", "assisted generation")})
        by_category = {g: v["estimate"] >= SPEC_BENCH_GOAL[1] for g, v in ratios[0]["speedup"].items() if g != "overall"}
        goal = {"what": SPEC_BENCH_GOAL[0], "goal": SPEC_BENCH_GOAL[1], "met_by_category": by_category,
                "met": all(by_category.values())}
    if draft_stop and ASSISTED_ADAPTIVE in single:  # adaptive blocks against transformers' adaptive drafts
        ratios.insert(1 if goal else 0, {"name": f"{exact} / {ASSISTED_ADAPTIVE}", "speedup": over(exact, ASSISTED_ADAPTIVE)})
    counts = {g: len(idx) for g, idx in groups.items()}
    turns = {g: int(np.isin(owners, idx).sum()) for g, idx in groups.items()}
    records = [{"example_id": e.id, "category": e.category, "turns": 1 + len(e.followups), "configuration": name,
                "new_tokens": int(tokens[i]), "seconds": float(seconds[i])}
               for name, (tokens, seconds) in sums.items() for i, e in enumerate(examples)]
    return {"columns": list(groups), "prompts": counts, "turns": turns, "rows": rows, "ratios": ratios, "goal": goal,
            "records": records}


def _cell(interval: dict) -> str:
    return f"{interval['estimate']:.2f}x [{interval['low']:.2f}, {interval['high']:.2f}]"


def spec_bench_markdown(report: dict) -> str:
    """Spec-Bench's table (speed-up over the target alone per category, accepted tokens per target call, overall),
    the paired ratios per category, and whether exact decoding beats assisted generation by the goal everywhere."""
    t = report["spec_bench"]
    cats = t["columns"][:-1]
    subset = ", ".join(f"{c} {t['prompts'][c]}" + (f" ({t['turns'][c]} turns)" if t["turns"][c] != t["prompts"][c] else "")
                       for c in cats)
    lines = [f"# Spec-Bench: speed-up over the target alone, batch 1, greedy, 95% CI over prompts", "",
             f"{report['pair']} on {report['device']}; prompts per category: {subset}; up to {report['max_new_tokens']} "
             f"new tokens per turn, median of {report['repeats']} rounds.", "",
             "| configuration | " + " | ".join(cats) + " | tokens/target call | overall |",
             "|---|" + "---:|" * (len(cats) + 2)]
    for r in t["rows"]:
        tpc = "" if r["tokens_per_target_call"] is None else f"{r['tokens_per_target_call']:.2f}"
        lines.append(f"| {r['name']} | " + " | ".join(_cell(r["speedup"][c]) for c in cats) +
                     f" | {tpc} | {_cell(r['speedup']['overall'])} |")
    if t["ratios"]:
        lines += ["", "Paired ratios of tokens/s on the same prompts (95% CI over prompts):", "",
                  "| ratio | " + " | ".join(cats) + " | overall |", "|---|" + "---:|" * (len(cats) + 1)]
        lines += [f"| {r['name']} | " + " | ".join(_cell(r["speedup"][c]) for c in t["columns"]) + " |" for r in t["ratios"]]
    goal = t["goal"]
    if goal is not None:
        missed = [c for c, met in goal["met_by_category"].items() if not met]
        lines += ["", f"Goal: {goal['what']} >= {goal['goal']}: " +
                  ("met." if goal["met"] else f"**not met** in {len(missed)} of {len(cats)} ({', '.join(missed)}).")]
    return "\n".join(lines) + "\n"
