"""Presets built by fine-tuning on first use: a recipe (YAML configs of ``speccascade finetune``, one per
stage) is run once into the cache directory, keyed by a hash of the recipe, and reused from then on.

A recipe ``NAME`` is ``recipes/NAME-target.yaml`` then ``recipes/NAME-drafter.yaml``. A later stage may name
an earlier stage's ``out`` as its ``base`` or ``teacher``; the build replaces it with that stage's cached
directory. A killed build continues from the stages' last checkpoints; a changed recipe builds the stages it
changes anew, into a directory of its own (older builds stay until deleted).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from ..decoding.presets import cache_dir
from ..errors import SpeccascadeError

RECIPES = Path(__file__).parent / "recipes"
STAGES = ("target", "drafter")
FORMAT = 1  # bump when the fine-tuning code changes what a recipe produces
BUILD_MINUTES = {"smollm2-135m-arithmetic": 80, "smollm2-135m-arithmetic-demo": 10, "smollm2-135m-worked": 66}  # measured on a busy 2-core CPU (README)


def recipe(name: str, overrides: dict | None = None) -> dict[str, dict]:
    """The stages' settings: each stage's YAML, then ``overrides`` (keys for every stage, or per stage
    under ``"target"`` / ``"drafter"``)."""
    stages = {}
    for stage in STAGES:
        path = RECIPES / f"{name}-{stage}.yaml"
        if not path.exists():
            raise SpeccascadeError(f"no fine-tuning recipe {path}")
        stages[stage] = yaml.safe_load(path.read_text())
    overrides = dict(overrides or {})
    per_stage = {stage: overrides.pop(stage, {}) for stage in STAGES}
    return {stage: {**settings, **overrides, **per_stage[stage]} for stage, settings in stages.items()}


def _key(settings: dict) -> str:
    text = json.dumps({"format": FORMAT, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan(name: str, overrides: dict | None = None) -> dict[str, tuple[Path, dict]]:
    """Per stage: its cache directory and the settings ``finetune`` runs with there.

    A stage's directory is keyed by a hash of its own settings, where a reference to an earlier stage's
    ``out`` stands for that stage's key: changing the drafter's recipe rebuilds the drafter only, changing
    the target's rebuilds both.
    """
    stages = recipe(name, overrides)
    root = cache_dir() / "pairs" / name
    planned: dict[str, tuple[Path, dict]] = {}
    refs: dict[str, tuple[str, Path]] = {}  # an earlier stage's out -> (its key, its cache dir)
    for stage, settings in stages.items():
        settings = {k: v for k, v in settings.items() if k != "wandb_mode"}
        out = str(settings.pop("out", stage))
        linked = {k: refs[v] for k, v in settings.items() if k in ("base", "teacher") and isinstance(v, str) and v in refs}
        key = _key({**settings, **{k: f"stage:{ref[0]}" for k, ref in linked.items()}})
        planned[stage] = (root / f"{stage}-{key}", {**settings, **{k: str(ref[1]) for k, ref in linked.items()}})
        refs[out] = (key, root / f"{stage}-{key}")
    return planned


def built(directory: Path) -> bool:
    return (directory / "finetune.json").exists()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per recipe (another process waits, then finds the build done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(name: str, overrides: dict | None = None) -> tuple[Path, Path]:
    """The recipe's fine-tuned target and drafter directories, built first where the cache lacks them."""
    planned = plan(name, overrides)
    if not all(built(d) for d, _ in planned.values()):
        root = cache_dir() / "pairs" / name
        with _locked(root / ".lock"):
            if not all(built(d) for d, _ in planned.values()):
                _run(name, planned)
    return planned["target"][0], planned["drafter"][0]


def _run(name: str, planned: dict[str, tuple[Path, dict]]) -> None:
    from .train import finetune

    minutes = BUILD_MINUTES.get(name)
    target = planned["target"][1]
    print(f"speccascade: building the {name} pair on first use: fine-tuning {target.get('base')} on "
          f"{target.get('task')} in {len(planned)} stages{f' (about {minutes} minutes on a busy 2-core CPU, once)' if minutes else ''}; "
          f"cached in {planned['target'][0].parent}; a killed build continues where it stopped", file=sys.stderr)
    started = time.perf_counter()
    for i, (stage, (directory, settings)) in enumerate(planned.items(), 1):
        if built(directory):
            continue
        print(f"speccascade: {name} stage {i}/{len(planned)}: the {stage} -> {directory}", file=sys.stderr)
        finetune(directory, **settings)
    print(f"speccascade: built {name} in {(time.perf_counter() - started) / 60:.1f} minutes", file=sys.stderr)
