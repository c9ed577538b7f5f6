"""The measured configurations and how each is timed: wall time per round, peak memory, the share of
time inside the models' forward passes, and single-step forward times."""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..decoding import Autoregressive, DecodeStats, ModelPair, SpeculativeCascade
from ..decoding.cache import KVCache
from ..deferral import rules

Run = Callable[[torch.Tensor, torch.Tensor], DecodeStats]  # decodes one batch


@dataclass
class Configuration:
    """One measured configuration: a name, how it decodes a batch, and its batch size; ``in_spec_bench`` marks the
    rows of Spec-Bench's table (the target alone, assisted generation, exact decoding and the cascades: the others
    are left out to keep its long prompts affordable)."""

    name: str
    implementation: str
    batch_size: int
    run: Run
    models: tuple[torch.nn.Module, ...] = ()
    in_spec_bench: bool = False
    refills: bool = False  # ``run`` takes a whole chunk of prompts and decodes them at ``batch_size`` with continuous batching
    seconds: list[float] = field(default_factory=list)  # wall time of each timed round
    batch_seconds: list[list[float]] = field(default_factory=list)  # [round][batch] wall time of each batch
    batch_tokens: list[int] = field(default_factory=list)  # new tokens of each batch (of the last round)
    stats: DecodeStats = field(default_factory=DecodeStats)  # totals of the last round
    peak_mib: float = 0.0
    forward_share: float = float("nan")
    split_ms: dict[str, float] = field(default_factory=dict)  # ms per decoder step: drafter forwards, target forward, rest

    def decodes(self, ids: torch.Tensor) -> int:
        """How many of the prompts ``ids`` one ``run`` takes: a batch, or all of them where it refills its rows."""
        return ids.shape[0] if self.refills else self.batch_size


def configurations(pair: ModelPair, sizes: list[int], gamma: int, cascades: list[rules.Rule], new: int,
                   options: dict, block: dict, transformers_rows: bool = True) -> list[Configuration]:
    """transformers' generate and assisted generation (unless ``transformers_rows`` is false), then
    speccascade's decoders (see the package docstring).

    ``block`` (``bonus``, ``draft_stop``): how the cascade rows end blocks; with ``draft_stop`` an adaptive
    exact-decoding row (batch 1) runs beside the fixed-block ones.
    """

    def ours(decoder, batch_size: int | None = None) -> Run:
        return lambda ids, mask: decoder.generate(ids, mask, max_new_tokens=new, batch_size=batch_size).stats

    def hf(**assistant: object) -> Run:
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
            return DecodeStats(new_tokens=count_new(sequences[:, ids.shape[1]:], pair.eos_token_ids))
        return run

    both = (pair.drafter, pair.target)
    constant = dict(num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    adaptive = dict(num_assistant_tokens=20, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.4)
    configs = [
        Configuration("target, generate", "transformers", 1, hf(), (pair.target,)),
        Configuration("assisted generation", "transformers", 1, hf(**constant), both, in_spec_bench=True),
        # in Spec-Bench's table beside speccascade's own adaptive blocks (--draft-stop)
        Configuration(ASSISTED_ADAPTIVE, "transformers", 1, hf(**adaptive), both, in_spec_bench=bool(block["draft_stop"])),
    ] if transformers_rows else []
    configs += [
        Configuration("target alone", "speccascade", 1, ours(Autoregressive(pair, "target", **options)), (pair.target,),
                      in_spec_bench=True),
        Configuration("drafter alone", "speccascade", 1, ours(Autoregressive(pair, "drafter", **options)), (pair.drafter,)),
    ]
    stops = f", drafts stop below {block['draft_stop']:g}" if block["draft_stop"] else ""
    for rule in cascades:
        label = f"cascade {rule.spec}" + (", bonus from p" if block["bonus"] == "target" else "") + stops
        configs.append(Configuration(label, "speccascade", 1,
                                     ours(SpeculativeCascade(pair, rule, block_size=gamma, **block, **options)), both,
                                     in_spec_bench=True))
    if stops:  # beside the fixed-block rows below, which the derived numbers read
        adaptive = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=gamma, draft_stop=block["draft_stop"], **options)
        configs.append(Configuration(exact_name(block["draft_stop"]), "speccascade", 1, ours(adaptive), both,
                                     in_spec_bench=True))
    for b in sizes:  # batches above 1 refill finished rows from the chunk's waiting prompts (continuous batching)
        configs.append(Configuration("exact speculative decoding", "speccascade", b,
                                     ours(SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=gamma, **options), b), both,
                                     in_spec_bench=True, refills=b > 1))
    return configs


ASSISTED_ADAPTIVE = "assisted generation, adaptive drafts"  # transformers' defaults: up to 20 drafts, stopped below confidence 0.4


def exact_name(draft_stop: float) -> str:
    """The exact-decoding row that drafts blocks the way the cascade rows do (the cascades' baseline)."""
    return "exact speculative decoding" + (f", drafts stop below {draft_stop:g}" if draft_stop else "")


def count_new(new: torch.Tensor, eos: list[int]) -> int:
    """New tokens up to and including each row's first EOS (what speccascade counts)."""
    is_eos = torch.isin(new, torch.tensor(eos, device=new.device)) if eos else torch.zeros_like(new, dtype=torch.bool)
    ended = is_eos.any(1)
    lengths = torch.where(ended, is_eos.int().argmax(1) + 1, new.shape[1])
    return int(lengths.sum())


def batches(ids: torch.Tensor, mask: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, ids.shape[0], size):
        batch_mask = mask[start : start + size]
        width = int(batch_mask.sum(1).max())  # drop padding columns no row of this batch needs
        yield ids[start : start + size, -width:], batch_mask[:, -width:]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(config: Configuration, pair: ModelPair, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Decode one chunk of prompts in batches of ``config.batch_size`` (refilled, where it refills), adding to the
    current round (the last entry of ``seconds`` and ``batch_seconds``, opened by :func:`begin_round`): wall time,
    per-batch times, stats and peak memory."""
    stats = []
    with peak_memory(pair.device) as peak:
        for batch_ids, batch_mask in batches(ids, mask, config.decodes(ids)):
            sync(pair.device)
            began = time.perf_counter()
            stats.append(config.run(batch_ids, batch_mask))
            sync(pair.device)
            config.batch_seconds[-1].append(time.perf_counter() - began)
            config.seconds[-1] += config.batch_seconds[-1][-1]
            config.batch_tokens.append(stats[-1].new_tokens)
    config.stats = DecodeStats.merge([config.stats, *stats])
    config.peak_mib = max(config.peak_mib, peak())


def begin_round(config: Configuration) -> None:
    """Open a timed round: its wall time and per-batch times start empty, and stats count this round only."""
    config.seconds.append(0.0)
    config.batch_seconds.append([])
    config.batch_tokens, config.stats = [], DecodeStats()


def profiled(config: Configuration, pair: ModelPair, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One more run with both models' forwards timed (:class:`ForwardClock`): the share of wall time inside their forwards and the
    split of a decoder step (a block; a token for the single-model rows) into the drafter's forwards, the
    target's forward and the rest. Steps are counted as the target's forwards (the drafter's where the
    target never runs), which for transformers' rows counts its calls the same way."""
    if not config.models:  # nothing to time inside
        return
    with ForwardClock(pair) as clock:
        sync(pair.device)
        start = time.perf_counter()
        for batch_ids, batch_mask in batches(ids, mask, config.decodes(ids)):
            config.run(batch_ids, batch_mask)
        sync(pair.device)
        wall = time.perf_counter() - start
    inside = sum(clock.seconds.values())
    config.forward_share = inside / wall
    steps = clock.calls["target"] or clock.calls["drafter"]
    spent = {"drafter": clock.seconds["drafter"], "target": clock.seconds["target"], "rest": wall - inside}
    config.split_ms = {name: 1000 * s / steps for name, s in spent.items()}


class ForwardClock:
    """Seconds and calls inside each model's forward passes while the ``with`` block runs, and whether a
    forward is running now (``inside``).

    Each model's ``forward`` is wrapped for the block (an instance attribute, removed after): the clock
    starts and stops around the forward itself. Forward hooks would do the same through the module's
    hooked call path, which costs about 5 microseconds per call outside the interval they time, so on
    fast forwards they would charge the clock's own cost to the decoder's rest."""

    def __init__(self, pair: ModelPair) -> None:
        self.models = {"drafter": pair.drafter, "target": pair.target}
        self.device = pair.device
        self.started: list[float] = []
        self.reset()

    def reset(self) -> None:
        self.seconds = {name: 0.0 for name in self.models}
        self.calls = {name: 0 for name in self.models}

    @property
    def inside(self) -> bool:
        return bool(self.started)

    def timed(self, name: str, forward: Callable[..., object]) -> Callable[..., object]:
        """``forward``, timed into ``seconds[name]`` (``functools.wraps`` keeps its signature for callers that read it)."""

        device, started, clock = self.device, self.started, time.perf_counter

        @functools.wraps(forward)
        def call(*args, **kwargs):
            sync(device)
            started.append(clock())
            try:
                return forward(*args, **kwargs)
            finally:
                sync(device)
                self.seconds[name] += clock() - started.pop()
                self.calls[name] += 1

        return call

    def __enter__(self) -> ForwardClock:
        self.own = {name: vars(model).get("forward") for name, model in self.models.items()}  # a forward set on the instance
        for name, model in self.models.items():
            model.forward = self.timed(name, model.forward)
        return self

    def __exit__(self, *_) -> None:
        for name, model in reversed(self.models.items()):  # one model in both roles is wrapped twice
            vars(model).pop("forward", None)
            if self.own[name] is not None:
                model.forward = self.own[name]


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Callable[[], float]]:
    """Peak memory above the starting level while the block runs, in MiB (CUDA allocator or process RSS)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield lambda: (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    base, peak, stop = rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: (max(peak[0], rss()) - base) / 2**20
    finally:
        stop.set()
        thread.join()


def rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@torch.inference_mode()
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
                sync(pair.device)
                began = time.perf_counter()
                cache.forward(tokens, positions, mask)
                sync(pair.device)
                samples[name].append(time.perf_counter() - began)
    return {name: statistics.median(values[steps:]) for name, values in samples.items()}  # first round warms up
