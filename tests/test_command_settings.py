"""compare, operating-point, bench and finetune take settings dataclasses like the other commands: a bad value
is one ``error:`` line naming its flag (exit 2) before any work starts, ``--help`` lists every field with its
help, finetune's recipe (its provenance and the resume check) keeps its keys and values, and evaluate's and
compare's W&B tables share their key columns."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re

import pytest

from speccascade import cli, pairs
from speccascade import demo as demo_module
from speccascade.cli import main
from speccascade.errors import SpeccascadeError
from speccascade.evaluation.evaluate import EvaluateSettings
from speccascade.evaluation.report import FIELDS, comparison_point_rows
from speccascade.finetune import train as finetune_module
from speccascade.finetune.module import FinetuneModule, ModelRecipe
from speccascade.report import KEYS, comparison_table
from speccascade.settings import flag
from speccascade.tracing.log_traces import LogTracesSettings
from tests.training.test_train import planted_traces

CONVERTED = ("compare", "operating-point", "bench", "finetune")
compare_module = importlib.import_module("speccascade.evaluation.compare")  # the package exports functions of these names
op_module = importlib.import_module("speccascade.evaluation.operating_point")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_traces(tmp_path_factory.mktemp("planted"), examples=40, rows=5)


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly (exit 1, not 2) if a command gets past its settings to real work."""
    def forbidden(*_, **__):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(compare_module, "read_columns", forbidden)
    monkeypatch.setattr(op_module, "load_traces", forbidden)
    monkeypatch.setattr(pairs, "load_pair", forbidden)
    monkeypatch.setattr(finetune_module, "FinetuneModule", forbidden)
    monkeypatch.setattr(finetune_module, "locked", forbidden)


def _cases(traces, out) -> list[tuple[list[str], str]]:
    cmp = ["compare", "--traces", str(traces), "--out", str(out), "--wandb-mode", "disabled"]
    op = ["operating-point", "--traces", str(traces), "--rule", "opt"]
    bench = ["bench", "--models", "tiny-random", "--out", str(out)]
    ft = ["finetune", "--base", "tiny-random", "--out", str(out), "--wandb-mode", "disabled"]
    return [
        ([*cmp, "--resamples", "5"], "--resamples must be >= 10, got 5"),
        ([*cmp, "--seed", "-1"], "--seed must be >= 0"),
        ([*cmp, "--wandb-project", " "], "--wandb-project must not be empty"),
        ([*cmp, "--rules", "opt,,diff"], "has an empty item"),
        ([*cmp, "--heads", "a,"], "--heads 'a,' has an empty item"),
        (["compare", "--traces", str(out / "none"), "--out", str(out), "--wandb-mode", "disabled"], "holds no traces"),
        ([*op, "--target-loss", "1e999"], "--target-loss must be a finite number"),
        ([*op, "--target-loss", "0.1", "--target-deferral-rate", "0.2"], "exactly one of --target-deferral-rate"),
        ([*op, "--target-deferral-rate", "-0.1"], "--target-deferral-rate must be in [0, 1]"),
        ([*bench, "--block-size", "0"], "--block-size must be >= 1, got 0"),
        ([*bench, "--prompts", "0"], "--prompts must be >= 1"),
        ([*bench, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        ([*bench, "--models", "nope"], "unknown preset 'nope'"),
        ([*bench, "--bonus", "pi"], "--bonus: expected one of mix, target, got pi"),
        ([*bench, "--batch-sizes", "1,x"], "--batch-sizes '1,x'"),
        ([*ft, "--lr", "0"], "--lr must be > 0, got 0"),
        ([*ft, "--min-lr-ratio", "1.5"], "--min-lr-ratio must be <= 1"),
        ([*ft, "--distill-temperature", "0"], "--distill-temperature must be > 0"),
        ([*ft, "--lora-rank", "-1"], "--lora-rank must be >= 0"),
        ([*ft, "--lora-dropout", "2"], "--lora-dropout must be <= 1"),
        ([*ft, "--examples", "0"], "--examples must be >= 1"),
        ([*ft, "--eval-examples", "-1"], "--eval-examples must be >= 0"),
        ([*ft, "--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
        ([*ft, "--layers", "[1, 1]"], "--layers must be distinct indices"),
        ([*ft, "--distill-weight", "0.5"], "--distill-weight > 0 needs a teacher"),
        ([*ft, "--precision", "fp8"], "--precision must be one of"),
        ([*ft, "--wandb-group", " "], "--wandb-group must not be empty"),
    ]


def test_a_bad_value_is_one_line_naming_its_flag_before_any_work(planted, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    for argv, message in _cases(planted, out):
        code = main(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, (argv, err)
        assert len(errors) == 1 and message in errors[0], (argv, err)
        assert not out.exists(), f"{argv} wrote {out}"


@pytest.mark.parametrize("command", CONVERTED)
def test_help_lists_every_setting_with_its_help(command, capsys):
    _, settings = cli.COMMANDS[command]
    assert settings is not None and dataclasses.is_dataclass(settings)
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(settings):
        assert f.metadata.get("help"), f"{command}: {f.name} has no help"
        assert re.search(re.escape(flag(f.name)) + r"[ ,]", text), f"{command} --help lacks {flag(f.name)}"
        assert " ".join(f.metadata["help"].split())[:40] in text, f"{command} --help lacks the help of {f.name}"
    assert "_" not in " ".join(w for w in text.split() if w.startswith("--") and w != "--print-config")


def test_the_python_api_checks_the_same_settings(tmp_path, planted):
    with pytest.raises(SpeccascadeError, match="--lr must be > 0"):
        finetune_module.finetune(tmp_path / "f", base="tiny-random", lr=-1.0)
    with pytest.raises(SpeccascadeError, match="--resamples must be >= 10"):
        compare_module.compare(str(planted), tmp_path / "c", resamples=3, wandb_mode="disabled")
    with pytest.raises(SpeccascadeError, match="--steps must be an int"):
        finetune_module.finetune(tmp_path / "f", base="tiny-random", steps="many")
    assert not any(tmp_path.glob("[fc]"))


def test_finetune_recipe_keeps_its_keys_and_values(tmp_path):
    """finetune.json's ``recipe`` (and finetune-settings.json) as before the settings class: an existing fine-tune
    directory is still recognised, an unfinished one still resumable."""
    plan = finetune_module.resolve(finetune_module.FinetuneSettings(
        out=tmp_path / "x", base="tiny-random", layers="0-1,3", steps=7, lr=3e-4, teacher="tiny-random",
        distill_weight=0.5, lora_rank=4, lora_targets=["q_proj"], accelerator="cpu", wandb_mode="disabled"))
    assert list(plan.recipe) == [
        "base", "task", "data_file", "layers", "steps", "batch_size", "examples", "pack_length", "lr", "warmup_steps",
        "min_lr_ratio", "weight_decay", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "teacher",
        "distill_weight", "distill_temperature", "precision", "checkpoint_every", "eval_split", "eval_examples",
        "eval_batch_size", "max_new_tokens", "eval_seed", "seed"]
    assert plan.recipe == {
        "base": "tiny-random", "task": "arithmetic", "data_file": None, "layers": [0, 1, 3], "steps": 7, "batch_size": 16,
        "examples": None, "pack_length": 512, "lr": 3e-4, "warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0.0,
        "lora_rank": 4, "lora_alpha": 32.0, "lora_dropout": 0.0, "lora_targets": ["q_proj"], "teacher": "tiny-random",
        "distill_weight": 0.5, "distill_temperature": 1.0, "precision": "auto", "checkpoint_every": 25,
        "eval_split": "test", "eval_examples": 256, "eval_batch_size": 16, "max_new_tokens": 96, "eval_seed": 0, "seed": 0}


def test_finetune_module_takes_the_model_recipe_as_plain_hyperparameters():
    recipe = ModelRecipe(base="tiny-random", layers="0", steps=3, lr=0.01)
    module = FinetuneModule(recipe)
    assert dict(module.hparams) == {f.name: getattr(recipe, f.name) for f in dataclasses.fields(ModelRecipe)} | {"layers": [0]}
    assert module.model.config.num_hidden_layers == 1
    assert module.configure_optimizers()["optimizer"].param_groups[0]["lr"] == pytest.approx(0.01 * 1 / 10)  # warm-up


def test_evaluate_and_compare_tables_share_their_key_columns(planted):
    from speccascade.deferral import rules as R
    from speccascade.evaluation import offline

    columns = compare_module.read_columns(str(planted), [R.parse("opt").build(), R.parse("kl:tau=0.9").build()], [])
    result = offline.compare_columns(*columns, rules="opt,kl:tau=0.9", resamples=20)
    rows = comparison_point_rows(result)
    offline_table = comparison_table(rows, list(rows[0]))
    decoded = [dict.fromkeys(FIELDS, 0.0) | {"rule": "opt", "knob": 0.3}]
    online_table = comparison_table(decoded, [f for f in FIELDS if f not in ("guards", "records")])
    assert offline_table.columns[:2] == online_table.columns[:2] == list(KEYS)
    assert {r["rule"] for r in rows} == {"opt", "kl", "oracle"}
    assert all(isinstance(r["knob"], float) for r in rows)


def test_a_fine_tune_recorded_before_the_settings_class_is_still_recognised(tmp_path, capsys, monkeypatch):
    """finetune.json written by the flat-parameter finetune (ints given for float settings kept as ints) holds this
    fine-tune: nothing is trained again."""
    monkeypatch.setattr(finetune_module, "FinetuneModule", None)  # training would fail
    options = dict(base="tiny-random", layers=[0], teacher="tiny-random", distill_weight=0.5, steps=15, seed=1, lora_rank=8,
                   lora_targets=["q_proj"], weight_decay=0, lora_alpha=16, examples=40, wandb_mode="disabled")
    recorded = {"base": "tiny-random", "task": "arithmetic", "data_file": None, "layers": [0], "steps": 15, "batch_size": 16,
                "examples": 40, "pack_length": 512, "lr": 0.0001, "warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0,
                "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_targets": ["q_proj"], "teacher": "tiny-random",
                "distill_weight": 0.5, "distill_temperature": 1.0, "precision": "auto", "checkpoint_every": 25,
                "eval_split": "test", "eval_examples": 256, "eval_batch_size": 16, "max_new_tokens": 96, "eval_seed": 0,
                "seed": 1}  # as af69378 recorded these options
    done = {"base": "tiny-random", "task": "arithmetic", "mode": "lora", "steps": 15, "recipe": recorded}
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / finetune_module.PROVENANCE).write_text(json.dumps(done))
    assert finetune_module.finetune(tmp_path / "done", **options) == done
    assert "already holds this fine-tune" in capsys.readouterr().out
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / finetune_module.SETTINGS).write_text(json.dumps(recorded))
    assert finetune_module._prepare_out(tmp_path / "unfinished", finetune_module.resolve(
        finetune_module.FinetuneSettings(out=tmp_path / "unfinished", **options)).recipe) is None  # resumable


def test_the_demo_hands_every_setting_it_shares_with_a_step_to_that_step(tmp_path):
    s = demo_module.DemoSettings(out=tmp_path)
    sentinels = {f.name: object() for f in dataclasses.fields(s) if f.name != "out"}
    for name, value in sentinels.items():
        setattr(s, name, value)
    steps = {LogTracesSettings: (demo_module._traces(s, "traces", "train", 3), {"max_new_tokens"}),
             EvaluateSettings: (demo_module._evaluation(s, "never"), {"rules", "overwrite"})}
    for cls, (step, own) in steps.items():
        shared = {f.name for f in dataclasses.fields(cls)} & set(sentinels)
        assert {"drafter_vocab", "drafter_quantize", "temperature", "wandb_group"} <= shared
        assert all(getattr(step, name) is sentinels[name] for name in shared - own), cls.__name__
        assert all(getattr(step, name) is not sentinels[name] for name in own), cls.__name__
    assert demo_module._traces(s, "traces", "train", 3).max_new_tokens == LogTracesSettings.max_new_tokens
