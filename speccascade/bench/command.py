"""The ``speccascade bench`` command: check the settings, load the pair, time every configuration, write the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.tasks import Example, get_task
from ..data.tasks.base import conversation
from ..decoding import Autoregressive
from ..decoding.cache import LAYOUTS
from ..deferral import rules as R
from ..errors import SpeccascadeError
from ..listing import split_list
from ..outdir import OutputDir, writable
from ..pairs import check_heads, load_settings_pair
from ..report import read_json, say, write_json, write_text, wrote
from ..settings import (EXAMPLES_HIGH, BlockSettings, CategorySettings, OutputSettings, PairSettings, as_config,
                        resolve_groups, setting)
from .measure import begin_round, configurations, profiled, step_times, timed
from .report import markdown, report, spec_bench, spec_bench_markdown

SPEC_BENCH = "spec-bench"
DEFAULT_PROMPTS, DEFAULT_BATCH_SIZES = 8, "1,4,8"


@dataclass(kw_only=True)
class BenchSettings(CategorySettings, BlockSettings, PairSettings, OutputSettings):
    """Settings of ``bench`` (the pair, block and category groups, then its own); the block group applies to every
    speccascade row that drafts (exact decoding and the cascades), the category group to spec-bench."""

    out: Path = setting(help="output directory (bench.json, bench.md)")
    batch_sizes: str | None = setting(None, "comma-separated batch sizes for exact speculative decoding (default "
                                      f"{DEFAULT_BATCH_SIZES}; spec-bench runs at batch 1, as Spec-Bench does)")
    block_size: int = setting(5, "drafts per block (gamma), also transformers' num_assistant_tokens", low=1)
    alpha: float = setting(0.3, "the cascades' OPT and TokenV3 knob (when --rules is not given)")
    rules: str | None = setting(None, "cascade rules timed beside exact decoding, comma-separated "
                                "(gain:0.23,learned:DIR@0.25); default: opt and tokenv3 at --alpha")
    prompts: int | None = setting(None, f"prompts from the task's test split (default {DEFAULT_PROMPTS}; spec-bench: "
                                  "all those of --categories and --limit-per-category); each batch size decodes all of them",
                                  low=1, high=EXAMPLES_HIGH)
    max_new_tokens: int = setting(64, "new tokens per prompt", low=1)
    chunk: int | None = setting(None, "prompts the configurations take turns on (default: the largest batch size); "
                                "exact decoding at a batch size above 1 decodes a chunk with continuous batching", low=1)
    repeats: int = setting(3, "timed rounds after one warm-up round; medians are reported", low=1)
    task: str = setting("arithmetic", "task whose test prompts are decoded (spec-bench: Spec-Bench's table by category)")
    data_file: str | None = setting(None, "local JSONL/parquet file of the task's records (spec-bench: a copy of "
                                    "Spec-Bench's question.jsonl)")
    cache: str | None = setting(None, "speccascade KV cache, dynamic or static (default: static on CUDA, dynamic on the CPU)")
    compile: bool = setting(False, "torch.compile the models' single-step forward passes (needs --cache static)")
    device: str | None = setting(None, "cuda, cuda:N or cpu (default: cuda when present)")
    transformers: bool = setting(True, "time transformers' generate and assisted generation too (--no-transformers "
                                 "leaves them out: a shorter bench when only speccascade's rows are compared)")

    def check_bench(self) -> None:
        """What the field types and ranges do not say: choices, the cache that compile needs, the device."""
        if self.cache not in (None, *LAYOUTS):
            raise SpeccascadeError(f"--cache must be one of {', '.join(LAYOUTS)}, got {self.cache!r}")
        if self.compile and self.cache != "static":
            raise SpeccascadeError("--compile needs the static cache (--cache static)")
        if self.draft_stop and self.cache == "static":
            raise SpeccascadeError("--draft-stop needs the dynamic cache (--cache dynamic): blocks change length")
        if self.task == SPEC_BENCH and self.batch_sizes not in (None, "1", 1):
            raise SpeccascadeError(f"--batch-sizes {self.batch_sizes!r}: spec-bench runs at batch 1, as Spec-Bench does")
        _check_device(self.device)

    def config(self, cascades: list[R.Rule], examples: list[Example]) -> dict:
        """The settings recorded in bench.json."""
        picked = {"data_file": self.data_file, "categories": self.categories, "limit_per_category": self.limit_per_category}
        return {"task": self.task, "block_size": self.block_size, "rules": [r.spec for r in cascades], **self.block_options(),
                "prompts": len(examples), "max_new_tokens": self.max_new_tokens, "repeats": self.repeats, "chunk": self.chunk,
                "cache": self.cache or "default", "compile": self.compile, "transformers_rows": self.transformers,
                **{k: v for k, v in picked.items() if v is not None}}


@dataclass
class _Plan:
    """Resolved settings: everything checked, nothing loaded or written yet."""

    settings: BenchSettings
    cascades: list[R.Rule]
    sizes: list[int]
    examples: list
    out: OutputDir


def bench(out: Path, **options) -> dict:
    """Measure decode speed against transformers' generate and assisted generation; write bench.json and bench.md.

    ``options`` are the fields of :class:`BenchSettings` (the command line's flags); returns the report.
    """
    return run(resolve(BenchSettings(out=out, **options)))


def resolve(settings: BenchSettings) -> _Plan:
    """Refuse bad settings before any model loads or file is written; read the task's prompts."""
    s = resolve_groups(settings)
    s.check_bench()
    writable(s.out)
    cascades = cascade_rules(s.rules, s.alpha)
    examples = _examples(s)
    sizes = _batch_sizes(s.batch_sizes or ("1" if s.task == SPEC_BENCH else DEFAULT_BATCH_SIZES), len(examples))
    if s.chunk is not None and not sizes[-1] <= s.chunk <= len(examples):
        raise SpeccascadeError(f"--chunk {s.chunk}: a chunk must lie in [the largest batch size {sizes[-1]}, prompts={len(examples)}]")
    config = s.config(cascades, examples) | as_config(s, ("drafter", "target", "batch_sizes")) | s.pair_config()
    out = OutputDir(s.out, "bench", config, s.resume, s.overwrite).check()
    return _Plan(s, cascades, sizes, examples, out)


def _examples(s: BenchSettings) -> list[Example]:
    """The test prompts: those of the chosen categories (spec-bench), then the first ``--prompts`` of them."""
    limit = s.prompts or (None if s.task == SPEC_BENCH else DEFAULT_PROMPTS)
    task = get_task(s.task)
    if not s.picks:
        return task.examples("test", limit=limit, data_file=s.data_file)
    return s.by_category(task.examples("test", data_file=s.data_file))[:limit]


def run(plan: _Plan) -> dict:
    """Load the pair, time every configuration, write bench.json and bench.md (under the directory's lock)."""
    s = plan.settings
    with plan.out.claim():
        if plan.out.complete:
            say("bench", f"{s.out} holds this bench; nothing to do")
            return read_json(s.out / "bench.json")
        result = _timed(plan)
        plan.out.finish()
    return result


def _timed(plan: _Plan) -> dict:
    """Load the pair, time every configuration, write bench.json and bench.md (spec-bench's table first)."""
    s = plan.settings
    pair = load_settings_pair(s, device=s.device)
    check_heads(plan.cascades, pair)
    prompts, owners = turn_prompts(pair, plan.examples, s.max_new_tokens)
    ids, mask = pair.encode(prompts)
    configs = configurations(pair, plan.sizes, s.block_size, plan.cascades, s.max_new_tokens,
                             {"cache": s.cache, "compile": s.compile}, s.block_options(), s.transformers)
    spec = s.task == SPEC_BENCH
    if spec:
        configs = [c for c in configs if c.in_spec_bench]
    measure(configs, pair, ids, mask, s.repeats, warm_up=1 if spec else None, chunk=s.chunk)
    steps = step_times(pair, ids[:1, -int(mask[0].sum()) :], s.block_size, s.repeats)
    result = report(configs, steps, pair, s.config(plan.cascades, plan.examples) | {"turns": len(prompts)})
    if spec:
        result["spec_bench"] = spec_bench(configs, plan.examples, owners, s.draft_stop)
    text = (spec_bench_markdown(result) + "\n" if spec else "") + markdown(result)
    write_json(s.out / "bench.json", result)
    write_text(s.out / "bench.md", text)
    print(text)
    say("bench", wrote(s.out / "bench.md", s.out / "bench.json"))
    return result


def turn_prompts(pair, examples: list[Example], max_new_tokens: int) -> tuple[list, list[int]]:
    """Every turn of every example as a prompt, and the index of the example each belongs to.

    A later turn of a multi-turn example is the conversation so far, holding the target's greedy replies to
    the turns before it (decoded here, untimed), so that every configuration decodes the same prompts.
    """
    target = Autoregressive(pair, "target")
    prompts, owners = [], []
    for i, example in enumerate(examples):
        replies: list[str] = []
        for turn in range(1 + len(example.followups)):
            prompts.append(conversation(example, replies))
            owners.append(i)
            if turn < len(example.followups):
                ids, mask = pair.encode(prompts[-1:])
                replies.append(pair.decode(target.generate(ids, mask, max_new_tokens=max_new_tokens).new_tokens)[0])
    return prompts, owners


def measure(configs: list, pair, ids: torch.Tensor, mask: torch.Tensor, repeats: int, warm_up: int | None = None,
            chunk: int | None = None) -> None:
    """Time every configuration over one warm-up round and ``repeats`` timed rounds, then profile each once.

    Within a round the configurations take turns on each ``chunk`` of prompts (default: one largest
    batch), so a slow spell of a shared machine hits every configuration on the same prompts, not
    whichever configuration happened to run then; the paired intervals over prompts rest on that.
    ``warm_up`` prompts (all when None) make the warm-up round and the profiled run.
    """
    chunk = chunk or max(config.batch_size for config in configs)
    for round_ in tqdm(range(repeats + 1), desc="bench rounds", unit="round"):
        for config in configs:
            begin_round(config)
        stop = ids.shape[0] if round_ or warm_up is None else warm_up
        for start in range(0, stop, chunk):
            for config in configs:
                timed(config, pair, ids[start : start + chunk], mask[start : start + chunk])
        if round_ == 0:  # the warm-up round: first-use costs (weights paged in, kernels chosen) are not counted
            for config in configs:
                config.seconds, config.batch_seconds, config.peak_mib = [], [], 0.0
    for config in configs:
        profiled(config, pair, ids[:warm_up], mask[:warm_up])


def cascade_rules(text: str | None, alpha: float) -> list[R.Rule]:
    """The cascade rules to time: ``--rules`` parsed by the one rule parser, else OPT and TokenV3 at ``alpha``."""
    if text is None:
        return [R.OPT(alpha), R.TokenV3(alpha)]
    return [R.parse(item).build() for item in split_list(text, "--rules")]


def _batch_sizes(text: str, prompts: int) -> list[int]:
    items = split_list(str(text), "--batch-sizes")
    try:
        sizes = sorted({int(s) for s in items})
    except ValueError:
        raise SpeccascadeError(f"--batch-sizes {text!r}: batch sizes must be comma-separated integers") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > prompts:
        raise SpeccascadeError(f"--batch-sizes {text!r}: batch sizes must lie in [1, prompts={prompts}]")
    return sizes


def _check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise SpeccascadeError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SpeccascadeError(f"device {device!r} asked for, but no CUDA GPU is available to torch {torch.__version__} "
                               "(--device)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise SpeccascadeError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA GPUs (--device)")
