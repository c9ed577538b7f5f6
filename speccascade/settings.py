"""Settings shared by the commands, in groups (pair, task, decoding, launch, tracking, output).

Each command's settings class inherits the groups it needs and adds its own fields, so a setting
is defined once, with its help text and its checks, and the command line stays flat
(``--block-size``, YAML key ``block_size``). :func:`check` validates every field (type, choices,
range, finiteness) where settings are resolved: before any model loads or any file is written.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

import torch

from .decoding.cascade import BONUS
from .errors import SpeccascadeError
from .listing import split_list
from .outdir import fits
from .tracking import WANDB_MODES

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
SEED_HIGH = 2**32 - 1  # the largest seed numpy and Lightning's seed_everything take
INT_HIGH = 2**63 - 1  # the largest whole number torch and Python's indices (sys.maxsize) take
EXAMPLES_HIGH = 10_000_000  # examples a command reads or generates before it starts (a generated task never runs out)


def setting(default: Any = MISSING, help: str = "", *, low: float | None = None, high: float | None = None,
            above: float | None = None, below: float | None = None, finite: bool = True) -> Any:
    """A settings field: its default, its help text (``--help``) and its range (``low``/``high``
    inclusive, ``above``/``below`` exclusive); numbers must be finite unless ``finite=False``."""
    checks = {"low": low, "high": high, "above": above, "below": below, "finite": finite}
    return field(default=default, metadata={"help": help, **checks})


def seed_setting(help: str) -> Any:
    """A seed setting (default 0): a whole number that numpy, torch and Lightning all take."""
    return setting(0, help, low=0, high=SEED_HIGH)


def flag(name: str) -> str:
    """The command-line spelling of a field: ``block_size`` -> ``--block-size``."""
    return "--" + name.replace("_", "-")


def hints(cls: type) -> dict[str, Any]:
    """Each field's resolved type."""
    return typing.get_type_hints(cls)


def check(settings: Any) -> Any:
    """Validate and normalise every field of a settings dataclass in place (ints given for floats
    become floats, strings given for paths become paths); return it. Errors name the flag."""
    types_ = hints(type(settings))
    for f in dataclasses.fields(settings):
        value = _conform(getattr(settings, f.name), types_[f.name], f.name)
        _check_range(f, value)
        object.__setattr__(settings, f.name, value)
    return settings


def _conform(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _conform(value, option, name)
            except SpeccascadeError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise SpeccascadeError(f"unknown {name.replace('_', ' ')} {value!r}; choose one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        inner = args[0] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else None
        if origin is tuple and inner is None and len(args) != len(value):
            raise SpeccascadeError(f"{flag(name)} needs {len(args)} values, got {len(value)}")
        items = [_conform(v, inner or args[i], name) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint is Path and isinstance(value, (str, Path)):
        return Path(value)
    if hint is Any or (isinstance(hint, type) and hint not in (bool, int, float, str, Path) and isinstance(value, hint)):
        return value
    kind = getattr(hint, "__name__", str(hint))
    raise SpeccascadeError(f"{flag(name)} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value!r}")


NOUNS = {int: ("an int", "ints"), float: ("a number", "numbers"), str: ("a string", "strings"), Path: ("a path", "paths"),
         bool: ("true or false", "booleans"), type(None): ("null", "nulls")}


def accepts(cls: type, name: str) -> str:
    """What a setting of ``cls`` accepts, in words (``an int >= 1 or null``): what a refusal of its value names."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    bounds = " and ".join(f"{words} {_show(f.metadata[key])}" for key, words in
                          (("low", ">="), ("above", ">"), ("below", "<"), ("high", "<=")) if f.metadata.get(key) is not None)
    return _accepts(hints(cls)[name], bounds)


def _accepts(hint: Any, bounds: str) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_accepts(a, bounds) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple):
        count = "" if origin is list or args[-1] is Ellipsis else f"{len(args)} "
        plural = NOUNS.get(args[0], (None, getattr(args[0], "__name__", str(args[0]))))[1]
        return f"a list of {count}{plural}" + (f" {bounds}" if bounds and args[0] in (int, float) else "")
    noun = NOUNS.get(hint, (getattr(hint, "__name__", str(hint)),))[0]
    return f"{noun} {bounds}" if bounds and hint in (int, float) else noun


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _numbers(item)]
    return []


def _show(number: float) -> str:
    """A bound or a value as given: whole numbers in full (a seed's 4294967295), others short."""
    return f"{number:g}" if isinstance(number, float) else str(number)


def _check_range(f: dataclasses.Field, value: Any) -> None:
    m = f.metadata
    for number in _numbers(value):
        if m.get("finite", True) and not math.isfinite(number):
            raise SpeccascadeError(f"{flag(f.name)} must be a finite number, got {number}")
        for key, fails, words in (("low", lambda x, b: x < b, ">="), ("high", lambda x, b: x > b, "<="),
                                  ("above", lambda x, b: x <= b, ">"), ("below", lambda x, b: x >= b, "<")):
            bound = m.get(key)
            if bound is not None and (number != number or fails(number, bound)):
                raise SpeccascadeError(f"{flag(f.name)} must be {words} {_show(bound)}, got {_show(number)}")
        if isinstance(number, int) and abs(number) > INT_HIGH:
            raise SpeccascadeError(f"{flag(f.name)} must be a 64-bit whole number (at most {INT_HIGH}), got {number}")


@dataclass(kw_only=True)
class OutputSettings:
    """Where a command writes, and what it does with an earlier run's output there."""

    out: Path = setting(help="output directory")
    resume: bool = setting(False, "continue an interrupted (or finished) run in --out with the same settings")
    overwrite: bool = setting(False, "replace an earlier run of this command in --out (other commands' output is never replaced)")


@dataclass(kw_only=True)
class PairSettings:
    """The drafter and target."""

    models: str | None = setting("smollm2-135m", "model-pair preset; --drafter/--target hub ids or paths replace it")
    drafter: str | None = setting(None, "drafter hub id or path (with --target)")
    target: str | None = setting(None, "target hub id or path")
    drafter_vocab: str | None = setting(None, "score only the tokens of this task's train replies in the drafter's output "
                                        "head (a cheaper drafter step; decoding stays exact)")
    drafter_quantize: str | None = setting(None, "int8: the drafter computes with int8 weights (CPU; a cheaper drafter step; "
                                           "the target is untouched, so decoding stays exact)")

    def check_pair(self) -> None:
        from .decoding import PRESETS

        if self.drafter and not self.target:
            raise SpeccascadeError("--drafter needs --target (the drafter alone is no pair)")
        if self.drafter_vocab is not None:
            from .data.tasks import TASKS

            if self.drafter_vocab not in TASKS:
                raise SpeccascadeError(f"--drafter-vocab: unknown task {self.drafter_vocab!r}; choose one of {', '.join(TASKS)}")
        if self.drafter_quantize is not None:
            from .decoding.quantize import check_quantization

            check_quantization(self.drafter_quantize)
        if not (self.drafter or self.target):
            if self.models is None:
                raise SpeccascadeError("name a model pair: --models PRESET, or --drafter and --target")
            if self.models not in PRESETS:
                raise SpeccascadeError(f"unknown preset {self.models!r}; known: {', '.join(PRESETS)}")

    @property
    def preset(self) -> str | None:
        """The preset in use (None when --drafter/--target replace it)."""
        return None if (self.drafter or self.target) else self.models

    def pair_config(self) -> dict:
        """The pair's entries of a run's configuration beside drafter and target (runs of a full-vocabulary,
        float32 drafter keep the configuration they had)."""
        extra = {"drafter_vocab": self.drafter_vocab, "drafter_quantize": self.drafter_quantize}
        return {"models": self.preset} | {k: v for k, v in extra.items() if v}


@dataclass(kw_only=True)
class TaskSettings:
    """Which examples of which task."""

    task: str = setting("arithmetic", "task name (arithmetic, worked-arithmetic, gsm8k, summarisation, cnn-dm, translation, qa, "
                        "spec-bench)")
    data_file: str | None = setting(None, "local JSONL/parquet file of the task's records instead of the hub dataset")
    split: str = setting("train", "data split")
    limit: int | None = setting(64, f"number of examples (all when null; at most {EXAMPLES_HIGH})", low=1, high=EXAMPLES_HIGH)
    few_shot: int = setting(0, "solved examples put in each prompt (tasks that support it)", low=0)

    def examples(self, seed: int, pick: Callable[[list], list] | None = None):
        """The task and its examples (reads the data: a missing or malformed file is an error here); ``pick``
        chooses among all of the split's examples first, and ``--limit`` then keeps the first of those chosen."""
        from .data.tasks import get_task

        task = get_task(self.task)
        if self.data_file is not None and not fits(self.data_file, "--data-file").is_file():
            raise SpeccascadeError(f"data file {self.data_file} not found")
        if pick is None:
            return task, task.examples(self.split, limit=self.limit, data_file=self.data_file, seed=seed, few_shot=self.few_shot)
        chosen = pick(task.examples(self.split, data_file=self.data_file, seed=seed, few_shot=self.few_shot))
        return task, chosen[: self.limit]


@dataclass(kw_only=True)
class CategorySettings:
    """Which categories of a task whose examples have them (spec-bench), and how many examples of each."""

    categories: str | None = setting(None, "comma-separated categories to run (spec-bench: mt_bench, translation, "
                                     "summarization, qa, math_reasoning, rag; default: all)")
    limit_per_category: int | None = setting(None, "at most this many examples of each category (all when null)", low=1)

    @property
    def picks(self) -> bool:
        """Whether a category or a count per category is asked for."""
        return self.categories is not None or self.limit_per_category is not None

    def by_category(self, examples: list) -> list:
        """The examples of the chosen categories, at most ``limit_per_category`` of each, in their order."""
        from .data.tasks.spec_bench import select

        if self.picks and not any(e.category for e in examples):
            raise SpeccascadeError("--categories and --limit-per-category need a task with categories (spec-bench)")
        chosen = None if self.categories is None else split_list(self.categories, "--categories")
        return select(examples, chosen, self.limit_per_category)


@dataclass(kw_only=True)
class DecodingSettings:
    """How examples are decoded."""

    block_size: int = setting(5, "drafts per block (gamma)", low=1)
    temperature: float = setting(0.0, "sampling temperature (0 = greedy)", low=0.0)
    max_new_tokens: int = setting(128, "new tokens per example", low=1)
    batch_size: int = setting(8, "examples decoded together", low=1)


@dataclass(kw_only=True)
class BlockSettings:
    """How the cascades end a block: where its bonus token comes from, and whether drafting stops early."""

    bonus: Literal[BONUS] = setting("mix", "the bonus token after a fully accepted block: mix (from pi, "
                                    "algorithms.md section 3) or target (from p: the drafter skips a step per block)")
    draft_stop: float = setting(0.0, "stop a row's block where the drafter's top-1 probability falls below this "
                                "(--block-size is then the longest block; 0 = fixed blocks)", low=0.0, below=1.0)

    def block_options(self) -> dict:
        """The decoder's keyword arguments; also what a run's configuration records beside the defaults."""
        return {"bonus": self.bonus, "draft_stop": self.draft_stop}

    def block_config(self) -> dict:
        """The options that differ from the defaults (runs made before they existed resume as before)."""
        defaults = {f.name: f.default for f in dataclasses.fields(BlockSettings)}
        return {k: v for k, v in self.block_options().items() if v != defaults[k]}


@dataclass(kw_only=True)
class LaunchSettings:
    """Processes and devices (Lightning)."""

    devices: int = setting(1, "processes per node (one per device)", low=1)
    num_nodes: int = setting(1, "nodes", low=1)
    accelerator: Literal[ACCELERATORS] = setting("auto", "cpu, cuda (gpu), mps or auto")

    def check_launch(self) -> None:
        if self.accelerator in ("cuda", "gpu"):
            if not torch.cuda.is_available():
                raise SpeccascadeError(f"--accelerator {self.accelerator} needs a CUDA GPU, and none is visible")
            if self.devices > torch.cuda.device_count():
                raise SpeccascadeError(f"--devices {self.devices}: only {torch.cuda.device_count()} CUDA GPUs are visible")
        if self.accelerator == "mps" and not torch.backends.mps.is_available():
            raise SpeccascadeError("--accelerator mps needs Apple's Metal backend, which is not available here")


@dataclass(kw_only=True)
class TrackingSettings:
    """Weights & Biases (offline first: nothing waits on the network)."""

    wandb_mode: Literal[WANDB_MODES] | None = setting(None, "offline, online or disabled (default: online only where W&B credentials exist)")
    wandb_project: str = setting("speccascade", "W&B project name")
    wandb_group: str | None = setting(None, "W&B group of this run: give a pipeline's commands one group to see "
                                      "their runs together (the demo sets one)")

    def check_tracking(self) -> None:
        from .tracking import resolve_wandb_mode

        if not self.wandb_project.strip():
            raise SpeccascadeError("--wandb-project must not be empty")
        if self.wandb_group is not None and not self.wandb_group.strip():
            raise SpeccascadeError("--wandb-group must not be empty (leave it out for no group)")
        self.wandb_mode = resolve_wandb_mode(self.wandb_mode)


def resolve_groups(settings: Any) -> Any:
    """:func:`check` every field, then each group's own checks (pair, launch, tracking)."""
    check(settings)
    for group, method in ((PairSettings, "check_pair"), (LaunchSettings, "check_launch"), (TrackingSettings, "check_tracking")):
        if isinstance(settings, group):
            getattr(settings, method)()
    return settings


def derived(cls: type, source: Any, keep_default: tuple[str, ...] = (), **values: Any) -> Any:
    """Settings of ``cls`` for a step that ``source``'s command runs: every field the two classes share takes
    ``source``'s value (so a setting added to both cannot be forgotten), except those in ``keep_default``
    (which mean something else there); ``values`` set the rest and win."""
    shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(source)}
    return cls(**{name: getattr(source, name) for name in shared - set(keep_default)} | values)


def as_config(settings: Any, keys: tuple[str, ...]) -> dict:
    """The named settings as JSON-ready values (what an output directory's marker records)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in ((k, getattr(settings, k)) for k in keys)}
