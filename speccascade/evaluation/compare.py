"""Run several decoders on the same prompts and tabulate their statistics side by side."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..decoding import Autoregressive, Decoder, ModelPair, SpeculativeCascade
from ..decoding.stats import DecodeStats
from ..deferral.rules import AlwaysDefer, Rule

TARGET = "target only"


@dataclass
class RunResult:
    """One decoder's outputs and statistics on a batch of prompts."""

    name: str
    stats: DecodeStats
    texts: list[str]

    def as_dict(self) -> dict:
        return {"name": self.name, "stats": self.stats.as_dict(), "texts": self.texts}


def decoders_for(pair: ModelPair, rule_list: list[Rule], block_size: int, temperature: float) -> dict[str, Decoder]:
    """The target alone, then one speculative cascade per rule (``always`` = exact speculative decoding)."""
    decoders: dict[str, Decoder] = {TARGET: Autoregressive(pair, "target", temperature=temperature)}
    for rule in rule_list:
        label = "speculative decoding" if isinstance(rule, AlwaysDefer) else rule.spec
        decoders[label] = SpeculativeCascade(pair, rule, block_size=block_size, temperature=temperature)
    return decoders


def run_all(
    pair: ModelPair,
    decoders: dict[str, Decoder],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    seed: int = 0,
) -> list[RunResult]:
    """Decode the same batch with every decoder, showing progress."""
    results = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("decoding", total=len(decoders))
        for name, decoder in decoders.items():
            progress.update(task, description=f"decoding with {name}")
            out = decoder.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, seed=seed)
            results.append(RunResult(name, out.stats, pair.decode(out.new_tokens)))
            progress.advance(task)
    return results


def stats_table(results: list[RunResult]) -> Table:
    """The measures of algorithms.md section 7: tokens per target call, acceptance and deferral
    rates of the examined drafts, and latency relative to the target alone."""
    base = next((r.stats.wall_s for r in results if r.name == TARGET), None)
    table = Table(title="decoding statistics (totals over prompts)")
    for header in ("decoder", "tokens", "target calls", "tokens/call", "accepted", "deferred", "wall s", "latency"):
        table.add_column(header, justify="left" if header == "decoder" else "right", no_wrap=True, min_width=len(header))
    for r in results:
        s = r.stats
        table.add_row(
            r.name,
            str(s.new_tokens),
            str(s.target_calls),
            f"{s.tokens_per_target_call:.2f}",
            "-" if r.name == TARGET else f"{s.acceptance_rate:.2f}",
            "-" if r.name == TARGET else f"{s.deferral_rate:.2f}",
            f"{s.wall_s:.1f}",
            f"{s.wall_s / base:.2f}x" if base else "-",
        )
    return table
