"""Recipe presets are built above the decoder: ``speccascade.load_pair`` asks the fine-tuning stage for the built
directories, the decoder's own loader only loads and refuses a preset it would have to build."""

from __future__ import annotations

import pytest

import speccascade
from speccascade import decoding, pairs
from speccascade.errors import SpeccascadeError
from speccascade.finetune import preset

RECIPE_PRESET = "smollm2-135m-arithmetic"


def test_the_decoders_loader_refuses_a_preset_it_would_have_to_build():
    with pytest.raises(SpeccascadeError, match="built by fine-tuning on first use: load it with speccascade.load_pair"):
        decoding.load_pair(RECIPE_PRESET)


def test_load_pair_builds_a_recipe_preset_and_loads_its_directories_under_the_presets_name(monkeypatch, tmp_path):
    built = (tmp_path / "target", tmp_path / "drafter")
    asked, loaded = [], {}
    monkeypatch.setattr(preset, "build", lambda name: asked.append(name) or built)
    monkeypatch.setattr(pairs, "load_built_pair", lambda name, **kw: loaded.update(name=name, **kw) or "pair")
    assert speccascade.load_pair is pairs.load_pair
    assert speccascade.load_pair(RECIPE_PRESET, device="cpu") == "pair"
    assert asked == [decoding.PRESETS[RECIPE_PRESET].recipe]
    assert loaded == {"name": RECIPE_PRESET, "target": str(built[0]), "drafter": str(built[1]), "device": "cpu"}


def test_load_pair_builds_nothing_for_a_preset_without_a_recipe(monkeypatch):
    monkeypatch.setattr(preset, "build", lambda name: pytest.fail(f"built {name}"))
    pair = speccascade.load_pair("tiny-random", device="cpu")
    assert pair.name == "tiny-random" and pair.target_id == "tiny-random/2-layer"
