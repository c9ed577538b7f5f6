"""W&B lineage, read back from offline run files: a tiny-random pipeline's runs share a group; the traces
are a ``dataset`` artifact by reference, the head a ``model`` artifact, and each run uses what it reads."""

from __future__ import annotations

import json

import pytest

from speccascade import __version__
from speccascade.tracing.log_traces import log_traces
from speccascade.deferral.heads import fingerprint
from speccascade.evaluation.compare import compare
from speccascade.evaluation.evaluate import evaluate
from speccascade.training import train_deferral

from tests.helpers import wandb_records

GROUP = "pipeline-1"


def _run(directory):
    """(run record, config, logged and used artifacts, tables aside) of the one offline run under ``directory/wandb``."""
    (run_dir,) = (directory / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type != "run_table"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    return run, config, [a for a in artifacts if not a.use_after_commit], [a for a in artifacts if a.use_after_commit]


def test_a_pipelines_runs_are_grouped_and_linked_by_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracking = {"wandb_mode": "offline", "wandb_group": GROUP}
    train, test, head = tmp_path / "train", tmp_path / "test", tmp_path / "head"
    for directory, split, limit in ((train, "train", 12), (test, "test", 6)):
        log_traces(directory, models="tiny-random", split=split, limit=limit, topk=0, **tracking)
    train_deferral([str(train)], head, epochs=1, batch_size=256, **tracking)
    compare(str(test), tmp_path / "cmp", heads=str(head), rules="diff", resamples=20, **tracking)
    evaluate(tmp_path / "eval", models="tiny-random", limit=2, rules=f"learned:{head}@0.5", max_new_tokens=4, **tracking)

    runs = {name: _run(tmp_path / name) for name in ("train", "test", "head", "cmp", "eval")}
    assert {run.run_group for run, *_ in runs.values()} == {GROUP}
    assert all(config["speccascade_version"] == __version__ for _, config, *_ in runs.values())
    traces = {}
    for name in ("train", "test"):  # each trace directory: a dataset artifact of its manifest and shard references
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        (logged,), used = runs[name][2:]
        assert not used and logged.type == "dataset" and logged.name == f"traces-{manifest['fingerprint']}"
        entries = {c.path: c for c in logged.manifest.contents}
        assert set(entries) == {"manifest.json", *(s["file"] for s in manifest["shards"])}
        assert all(entries[s["file"]].ref == (tmp_path / name / s["file"]).resolve().as_uri()
                   for s in manifest["shards"])
        assert entries["manifest.json"].digest  # the manifest holds every shard's sha256
        assert json.loads(logged.metadata)["speccascade_version"] == __version__
        traces[name] = logged
    (model,), used = runs["head"][2:]  # train-deferral: uses the training traces, logs the head
    assert [(a.name, a.digest) for a in used] == [(traces["train"].name, traces["train"].digest)]
    assert model.type == "model" and model.name == f"deferral-head-{fingerprint(head)}"
    assert {c.path for c in model.manifest.contents} == {"config.json", "model.safetensors", "metrics.json"}
    logged, used = runs["cmp"][2:]  # compare: the held-out traces and the head, the very versions logged
    assert not logged and {(a.name, a.digest) for a in used} == {(traces["test"].name, traces["test"].digest),
                                                                 (model.name, model.digest)}
    logged, used = runs["eval"][2:]  # evaluate learned:DIR uses the head's model artifact
    assert not logged and [(a.name, a.type, a.digest) for a in used] == [(model.name, "model", model.digest)]
    config = json.loads((head / "config.json").read_text())
    assert config["provenance"]["speccascade_version"] == __version__


def test_the_demo_groups_its_four_steps_and_an_empty_group_is_refused(tmp_path):
    from speccascade.errors import SpeccascadeError
    from speccascade.demo import DemoSettings, resolve

    plan = resolve(DemoSettings(out=tmp_path / "demo", models="tiny-random", wandb_mode="offline"))
    group = plan.settings.wandb_group
    assert group.startswith("demo-") and {plan.traces.settings.wandb_group, plan.held_out.settings.wandb_group,
                                          plan.head.wandb_group} == {group}
    assert resolve(DemoSettings(out=tmp_path / "d2", models="tiny-random", wandb_group="mine")).head.wandb_group == "mine"
    with pytest.raises(SpeccascadeError, match="--wandb-group must not be empty"):
        log_traces(tmp_path / "t", models="tiny-random", wandb_group=" ")
