"""The ``speccascade bench`` command: check the settings, load the pair, time every configuration, write the report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.tasks import get_task
from ..decoding import load_pair
from ..decoding.cache import LAYOUTS
from ..decoding.cascade import BONUS
from ..deferral import rules as R
from ..errors import SpeccascadeError
from .measure import configurations, profiled, step_times, timed
from .report import markdown, report


def bench(
    out: Path,
    models: str = "smollm2-135m",
    batch_sizes: str = "1,4,8",
    block_size: int = 5,
    alpha: float = 0.3,
    rules: str | None = None,
    bonus: str = "mix",
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
        alpha: the cascades' OPT and TokenV3 knob (when --rules is not given).
        rules: cascade rules timed beside exact decoding, comma-separated (gain:0.23,learned:DIR@0.25);
            default: opt and tokenv3 at --alpha.
        bonus: the cascade rows' bonus token: mix (from pi) or target (from p; the drafter skips a step per block).
        prompts: prompts from the task's test split; each batch size decodes all of them.
        max_new_tokens: new tokens per prompt.
        repeats: timed rounds after one warm-up round; medians are reported.
        task: task whose test prompts are decoded.
        cache: speccascade KV cache, dynamic or static (default: static on CUDA, dynamic on the CPU).
        compile: torch.compile the models' single-step forward passes (needs --cache static).
        device: cuda, cuda:N or cpu (default: cuda when present).
    """
    _check(Path(out), block_size, alpha, prompts, max_new_tokens, repeats, cache, compile, device)
    cascades = cascade_rules(rules, alpha)
    if bonus not in BONUS:
        raise SpeccascadeError(f"bonus must be one of {', '.join(BONUS)}, got {bonus!r}")
    sizes = _batch_sizes(batch_sizes, prompts)
    examples = get_task(task).examples("test", limit=prompts)
    pair = load_pair(models, device=device)
    ids, mask = pair.encode([e.prompt for e in examples])
    configs = configurations(pair, sizes, block_size, cascades, max_new_tokens, {"cache": cache, "compile": compile},
                             bonus)
    measure(configs, pair, ids, mask, repeats)
    steps = step_times(pair, ids[:1, -int(mask[0].sum()) :], block_size, repeats)
    settings = {"task": task, "block_size": block_size, "rules": [r.spec for r in cascades], "bonus": bonus, "prompts": prompts, "max_new_tokens": max_new_tokens,
                "repeats": repeats, "cache": cache or "default", "compile": compile}
    result = report(configs, steps, pair, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))
    print(markdown(result))
    return result


def measure(configs: list, pair, ids: torch.Tensor, mask: torch.Tensor, repeats: int) -> None:
    """Time every configuration in interleaved rounds after one warm-up round, then profile each once."""
    for round_ in tqdm(range(repeats + 1), desc="bench rounds", unit="round"):
        for config in configs:
            timed(config, pair, ids, mask)
        if round_ == 0:  # the warm-up round: first-use costs (weights paged in, kernels chosen) are not counted
            for config in configs:
                config.seconds, config.peak_mib = [], 0.0
    for config in configs:
        profiled(config, pair, ids, mask)


def cascade_rules(text: str | None, alpha: float) -> list[R.Rule]:
    """The cascade rules to time: ``--rules`` parsed by the one rule parser, else OPT and TokenV3 at ``alpha``."""
    if text is None:
        return [R.OPT(alpha), R.TokenV3(alpha)]
    return [R.parse(item) for item in R.split_specs(str(text))]


def _batch_sizes(text: str, prompts: int) -> list[int]:
    try:
        sizes = sorted({int(s) for s in str(text).split(",") if s.strip()})
    except ValueError:
        raise SpeccascadeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > prompts:
        raise SpeccascadeError(f"batch sizes must lie in [1, prompts={prompts}], got {text!r}")
    return sizes


def _check(out: Path, block_size: int, alpha: float, prompts: int, max_new_tokens: int, repeats: int,
           cache: str | None, compile: bool, device: str | None) -> None:
    """Refuse bad settings before any model loads or file is written."""
    for name, value in (("block_size", block_size), ("prompts", prompts), ("max_new_tokens", max_new_tokens), ("repeats", repeats)):
        if value < 1:
            raise SpeccascadeError(f"{name} must be >= 1, got {value}")
    if not math.isfinite(alpha):
        raise SpeccascadeError(f"alpha must be a finite number, got {alpha}")
    if cache not in (None, *LAYOUTS):
        raise SpeccascadeError(f"cache must be one of {', '.join(LAYOUTS)}, got {cache!r}")
    if compile and cache != "static":
        raise SpeccascadeError("compile needs the static cache (--cache static)")
    _check_device(device)
    if out.exists() and not out.is_dir():
        raise SpeccascadeError(f"--out {out} is a file, not a directory")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise SpeccascadeError(f"--out {out}: {existing} is not writable")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise SpeccascadeError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SpeccascadeError(f"device {device!r} asked for, but no CUDA GPU is available to torch {torch.__version__}")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise SpeccascadeError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA GPUs")
