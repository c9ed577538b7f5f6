"""``speccascade demo``: decode a few prompts with the embedded default pair under several rules."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..decoding import load_pair
from ..deferral import rules as rules_module
from .compare import decoders_for, run_all, stats_table

DEMO_PROMPTS = [
    "What is 12 + 7?",
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
]


def demo(
    models: str = "smollm2-135m",
    rules: str = "always,opt:0.3,tokenv3:0.5,chow:0.4",
    prompts: list[str] | None = None,
    max_new_tokens: int = 48,
    block_size: int = 5,
    temperature: float = 0.0,
    seed: int = 0,
    out: Path | None = None,
) -> dict:
    """Decode a few prompts with a model pair under several deferral rules and print the statistics.

    Args:
        models: model-pair preset (smollm2-135m is embedded: no network needed).
        rules: comma-separated deferral rules, each name or name:value (always = exact speculative decoding).
        prompts: the prompts; a few arithmetic and chat prompts by default.
        max_new_tokens: new tokens per prompt.
        block_size: drafts per block (gamma).
        temperature: sampling temperature (0 = greedy).
        seed: random seed of the first prompt (the next prompts take seed + 1, ...).
        out: directory for demo.json (statistics and texts); nothing is written without it.
    """
    console = Console(width=max(Console().width, 110))
    rule_list = [rules_module.parse(spec) for spec in rules.split(",") if spec.strip()]
    with console.status(f"loading model pair {models}"):
        pair = load_pair(models)
    console.print(f"drafter: {pair.drafter_id}\ntarget:  {pair.target_id}")
    ids, mask = pair.encode(prompts or DEMO_PROMPTS)
    results = run_all(pair, decoders_for(pair, rule_list, block_size, temperature), ids, mask, max_new_tokens, seed)
    console.print(stats_table(results))
    console.print(f"\n[bold]{(prompts or DEMO_PROMPTS)[0]}[/bold]")
    for r in results:
        console.print(f"  [cyan]{r.name}[/cyan]: {r.texts[0].strip()[:160]!r}")
    report = {"models": models, "block_size": block_size, "temperature": temperature,
              "results": [r.as_dict() for r in results]}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(report, indent=2))
        console.print(f"\nwrote {out / 'demo.json'}")
    return report
