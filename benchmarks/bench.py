"""``speccascade bench``: decode speed against the peers, side by side in one run.

On one pair, the same prompts, block size gamma and greedy decoding, it measures tokens per
second of (a) the target alone with transformers' ``generate``, (b) transformers' assisted
generation with the same drafter as a standalone model (``num_assistant_tokens = gamma``, constant
schedule, no confidence early stop), and for reference with its defaults (up to 20 drafts, stopped
early where the drafter's confidence falls below 0.4), (c) speccascade's target alone and drafter alone, (d) exact
speculative decoding, (e) speculative cascades under OPT and TokenV3 at one alpha, and (f) exact
speculative decoding at each batch size. Configurations are interleaved over ``repeats`` rounds
after a warm-up and reported as medians, so machine noise hits them alike.

Derived numbers (algorithms.md section 7): the cost ratio ``c`` = drafter step / target step
(single cached forwards, timed interleaved), per-token acceptance ``a``, the ideal speed-up
``(1 - a^(gamma+1)) / ((1 - a)(gamma c + 1))`` and efficiency = measured / ideal speed-up, and the
share of decode wall time spent outside the two models' forward passes (one extra timed run per
speccascade configuration, forward hooks on both models).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import transformers
from tqdm.auto import tqdm

from speccascade.data.tasks import get_task
from speccascade.decoding import Autoregressive, ModelPair, SpeculativeCascade, load_pair
from speccascade.decoding.cache import KVCache
from speccascade.deferral import rules
from speccascade.errors import SpeccascadeError

GOALS = {
    "exact_sd_vs_assisted": ("exact speculative decoding / transformers assisted generation, batch 1", 1.2),
    "efficiency": ("measured / ideal speed-up of exact speculative decoding, batch 1", 0.85),
    "batch8_vs_batch1": ("exact speculative decoding throughput, batch 8 / batch 1", 2.0),
    "overhead": ("share of exact-SD wall time outside the models' forward passes (at most)", 0.10),
}


@dataclass
class Config:
    """One measured configuration: a name, how it decodes a batch, and its batch size."""

    name: str
    implementation: str
    batch_size: int
    run: Callable[[torch.Tensor, torch.Tensor], tuple[int, object]]  # -> (new tokens, stats or None)
    models: tuple[torch.nn.Module, ...] = ()
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    stats: object = None
    peak_mib: float = 0.0
    forward_share: float = float("nan")


def bench(
    out: Path,
    models: str = "smollm2-135m",
    batch_sizes: str = "1,4,8",
    block_size: int = 5,
    alpha: float = 0.3,
    prompts: int = 8,
    max_new_tokens: int = 64,
    repeats: int = 3,
    task: str = "arithmetic",
    cache: str | None = None,
    compile: bool = False,
    device: str | None = None,
) -> dict:
    """Measure decode speed against transformers' generate and assisted generation; write bench.json and bench.md.

    Args:
        out: output directory (bench.json, bench.md).
        models: model-pair preset (tiny-random, smollm2-135m, ...).
        batch_sizes: comma-separated batch sizes for exact speculative decoding.
        block_size: drafts per block (gamma), also transformers' num_assistant_tokens.
        alpha: the cascades' OPT and TokenV3 knob.
        prompts: prompts from the task's test split; each batch size decodes all of them.
        max_new_tokens: new tokens per prompt.
        repeats: timed rounds after one warm-up round; medians are reported.
        task: task whose test prompts are decoded.
        cache: speccascade KV cache, dynamic or static (default: static on CUDA, dynamic on the CPU).
        compile: torch.compile the models' single-step forward passes (CUDA, static cache).
        device: cuda or cpu (default: cuda when present).
    """
    sizes = _batch_sizes(batch_sizes, prompts)
    if repeats < 1 or max_new_tokens < 1:
        raise SpeccascadeError("repeats and max_new_tokens must be >= 1")
    pair = load_pair(models, device=device)
    ids, mask = pair.encode([e.prompt for e in get_task(task).examples("test", limit=prompts)])
    options = {"cache": cache, "compile": compile}
    configs = _configs(pair, sizes, block_size, alpha, max_new_tokens, options)

    for round_ in tqdm(range(repeats + 1), desc="bench rounds", unit="round"):
        for config in configs:
            _timed(config, pair, ids, mask)
        if round_ == 0:  # the warm-up round: first-use costs (weights paged in, kernels chosen) are not counted
            for config in configs:
                config.seconds, config.peak_mib = [], 0.0
    for config in configs:
        _profiled(config, pair, ids, mask)

    steps = step_times(pair, ids[:1, -int(mask[0].sum()) :], block_size, repeats)
    report = _report(configs, steps, pair, block_size, alpha, prompts, max_new_tokens, repeats, options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    print(markdown(report))
    return report


def _batch_sizes(text: str, prompts: int) -> list[int]:
    try:
        sizes = sorted({int(s) for s in str(text).split(",") if s.strip()})
    except ValueError:
        raise SpeccascadeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > prompts:
        raise SpeccascadeError(f"batch sizes must lie in [1, prompts={prompts}], got {text!r}")
    return sizes


def _configs(pair: ModelPair, sizes: list[int], gamma: int, alpha: float, new: int, options: dict) -> list[Config]:
    def ours(decoder) -> Callable:
        def run(ids, mask):
            result = decoder.generate(ids, mask, max_new_tokens=new)
            return result.stats.new_tokens, result.stats
        return run

    def hf(**assistant: object) -> Callable:
        """transformers' generate; with ``assistant`` settings, assisted generation by the drafter.

        transformers reads the assistant's settings from the assistant model's own generation
        config (not from ``generate``'s arguments), so they are set there for the call.
        """
        def run(ids, mask):
            extra = {"assistant_model": pair.drafter} if assistant else {}
            saved = {k: getattr(pair.drafter.generation_config, k, None) for k in assistant}
            pair.drafter.generation_config.update(**assistant)
            try:
                with torch.inference_mode():
                    sequences = pair.target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                                     pad_token_id=pair.pad_token_id, **extra)
            finally:
                pair.drafter.generation_config.update(**saved)
            return _count_new(sequences[:, ids.shape[1]:], pair.eos_token_ids, pair.pad_token_id), None
        return run

    both = (pair.drafter, pair.target)
    constant = dict(num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    adaptive = dict(num_assistant_tokens=20, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.4)
    configs = [
        Config("target, generate", "transformers", 1, hf(), (pair.target,)),
        Config("assisted generation", "transformers", 1, hf(**constant), both),
        Config("assisted generation, adaptive drafts", "transformers", 1, hf(**adaptive), both),
        Config("target alone", "speccascade", 1, ours(Autoregressive(pair, "target", **options)), (pair.target,)),
        Config("drafter alone", "speccascade", 1, ours(Autoregressive(pair, "drafter", **options)), (pair.drafter,)),
    ]
    for rule in (rules.OPT(alpha), rules.TokenV3(alpha)):
        configs.append(Config(f"cascade {rule.name}:{alpha}", "speccascade", 1,
                              ours(SpeculativeCascade(pair, rule, block_size=gamma, **options)), both))
    for b in sizes:
        configs.append(Config("exact speculative decoding", "speccascade", b,
                              ours(SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=gamma, **options)), both))
    return configs


def _count_new(new: torch.Tensor, eos: list[int], pad: int) -> int:
    """New tokens up to and including each row's first EOS (what speccascade counts)."""
    is_eos = torch.isin(new, torch.tensor(eos, device=new.device)) if eos else torch.zeros_like(new, dtype=torch.bool)
    ended = is_eos.any(1)
    lengths = torch.where(ended, is_eos.int().argmax(1) + 1, new.shape[1])
    return int(lengths.sum())


def _batches(ids: torch.Tensor, mask: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, ids.shape[0], size):
        batch_mask = mask[start : start + size]
        width = int(batch_mask.sum(1).max())  # drop padding columns no row of this batch needs
        yield ids[start : start + size, -width:], batch_mask[:, -width:]


def _sync(pair: ModelPair) -> None:
    if pair.device.type == "cuda":
        torch.cuda.synchronize(pair.device)


def _timed(config: Config, pair: ModelPair, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Decode every prompt once in batches of ``config.batch_size``; record the wall time and peak memory."""
    tokens, stats = 0, []
    with peak_memory(pair.device) as peak:
        _sync(pair)
        start = time.perf_counter()
        for batch_ids, batch_mask in _batches(ids, mask, config.batch_size):
            n, s = config.run(batch_ids, batch_mask)
            tokens += n
            stats.append(s)
        _sync(pair)
        config.seconds.append(time.perf_counter() - start)
    config.tokens = tokens
    config.stats = _merge(stats) if stats[0] is not None else None
    config.peak_mib = max(config.peak_mib, peak())


def _merge(stats: list) -> dict:
    keys = ("new_tokens", "target_calls", "accepted", "decided", "deferrals")
    return {k: sum(getattr(s, k) for s in stats) for k in keys}


def _profiled(config: Config, pair: ModelPair, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One more run with timing hooks on the models: the share of wall time inside their forwards."""
    if config.implementation != "speccascade":
        return
    spent = [0.0]
    starts: list[float] = []

    def before(*_):
        _sync(pair)
        starts.append(time.perf_counter())

    def after(*_):
        _sync(pair)
        spent[0] += time.perf_counter() - starts.pop()

    handles = [h for m in set(config.models) for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        _sync(pair)
        start = time.perf_counter()
        for batch_ids, batch_mask in _batches(ids, mask, config.batch_size):
            config.run(batch_ids, batch_mask)
        _sync(pair)
        config.forward_share = spent[0] / (time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Callable[[], float]]:
    """Peak memory above the starting level while the block runs, in MiB (CUDA allocator or process RSS)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield lambda: (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    base, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: (max(peak[0], _rss()) - base) / 2**20
    finally:
        stop.set()
        thread.join()


def _rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def step_times(pair: ModelPair, prompt: torch.Tensor, gamma: int, repeats: int, steps: int = 8) -> dict[str, float]:
    """Median seconds of one cached forward: a drafter step, a target step, and a target verify of gamma + 1 tokens.

    Timed after the same prompt, interleaved over ``repeats`` rounds (prefill and loop excluded), so
    ``c`` = drafter step / target step is the ratio of the forward passes themselves.
    """
    samples: dict[str, list[float]] = {"drafter": [], "target": [], "verify": []}
    width = prompt.shape[1]
    for _ in range(repeats + 1):
        for name, n in (("drafter", 1), ("target", 1), ("verify", gamma + 1)):
            cache = KVCache(pair.drafter if name == "drafter" else pair.target, pair.vocab_size)
            cache.forward(prompt, torch.arange(width, device=pair.device).unsqueeze(0), torch.ones_like(prompt, dtype=torch.bool), logits_to_keep=1)
            tokens = prompt[:, -1:].expand(1, n)
            for i in range(steps):
                start = width + i * n
                positions = torch.arange(start, start + n, device=pair.device).unsqueeze(0)
                mask = torch.ones(1, start + n, dtype=torch.bool, device=pair.device)
                _sync(pair)
                began = time.perf_counter()
                cache.forward(tokens, positions, mask)
                _sync(pair)
                samples[name].append(time.perf_counter() - began)
    return {name: statistics.median(values[steps:]) for name, values in samples.items()}  # first round warms up


def _report(configs: list[Config], steps: dict[str, float], pair: ModelPair, gamma: int, alpha: float, prompts: int,
            new: int, repeats: int, options: dict) -> dict:
    rows = []
    for c in configs:
        median = statistics.median(c.seconds)
        row = {"name": c.name, "implementation": c.implementation, "batch_size": c.batch_size,
               "tokens_per_s": c.tokens / median, "seconds": c.seconds, "new_tokens": c.tokens,
               "peak_memory_mib": c.peak_mib, "forward_share": c.forward_share}
        if c.stats is not None and c.stats["target_calls"]:
            s = c.stats
            row |= {"tokens_per_target_call": s["new_tokens"] / s["target_calls"],
                    "acceptance": s["accepted"] / s["decided"] if s["decided"] else None,
                    "deferral_rate": s["deferrals"] / s["decided"] if s["decided"] else None}
        rows.append(row)
    by_name = {(r["name"], r["batch_size"]): r for r in rows}
    target = by_name[("target alone", 1)]
    for r in rows:
        r["speedup_vs_target"] = r["tokens_per_s"] / target["tokens_per_s"]

    c = steps["drafter"] / steps["target"]
    sd1 = by_name[("exact speculative decoding", 1)]
    a = sd1.get("acceptance") or 0.0
    ideal = _ideal_speedup(a, gamma, c)
    sizes = sorted(r["batch_size"] for r in rows if r["name"] == "exact speculative decoding")
    ratios = {
        "exact_sd_vs_assisted": sd1["tokens_per_s"] / by_name[("assisted generation", 1)]["tokens_per_s"],
        "efficiency": sd1["speedup_vs_target"] / ideal,
        "overhead": 1 - sd1["forward_share"],
    }
    if 8 in sizes:
        ratios["batch8_vs_batch1"] = by_name[("exact speculative decoding", 8)]["tokens_per_s"] / sd1["tokens_per_s"]
    goals = {k: {"what": GOALS[k][0], "value": v, "goal": GOALS[k][1],
                 "met": v <= GOALS[k][1] if k == "overhead" else v >= GOALS[k][1]} for k, v in ratios.items()}
    return {
        "pair": pair.name, "drafter": pair.drafter_id, "target": pair.target_id, "device": _device_name(pair.device),
        "dtype": str(pair.target.dtype).removeprefix("torch."), "block_size": gamma, "alpha": alpha,
        "prompts": prompts, "max_new_tokens": new, "repeats": repeats, "cache": options["cache"] or "default",
        "compile": options["compile"], "torch": torch.__version__, "transformers": transformers.__version__,
        "cost_ratio_c": c, "step_ms": {k: 1000 * v for k, v in steps.items()},
        "verify_cost": steps["verify"] / steps["target"], "acceptance_batch1": a, "ideal_speedup": ideal, "goals": goals, "results": rows,
    }


def _ideal_speedup(a: float, gamma: int, c: float) -> float:
    """algorithms.md section 7: ``(1 - a^(gamma+1)) / ((1 - a)(gamma c + 1))``."""
    tokens = gamma + 1 if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)
    return tokens / (gamma * c + 1)


def _device_name(device: torch.device) -> str:
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
        f"rounds; cache {report['cache']}, compile {report['compile']}; torch {report['torch']}, "
        f"transformers {report['transformers']}.",
        "",
        "| configuration | implementation | batch | tokens/s | vs target alone | tokens/target call | acceptance | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        tpc, acc = r.get("tokens_per_target_call"), r.get("acceptance")
        lines.append(
            f"| {r['name']} | {r['implementation']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | "
            f"{r['speedup_vs_target']:.2f}x | {'' if tpc is None else f'{tpc:.2f}'} | "
            f"{'' if acc is None else f'{acc:.2f}'} | {r['peak_memory_mib']:.0f} |"
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
    return "\n".join(lines) + "\n"
