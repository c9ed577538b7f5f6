"""Bad input through the command line: exit code, exactly one ``error:`` line, no traceback, nothing left behind.

The table runs in-process through ``cli.main`` (every case fails while settings are resolved, before any
model loads); a few cases, the unexpected-exception path and ``--version`` run as real subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speccascade import __version__
from speccascade.cli import main
from speccascade.data import traces
from speccascade.deferral import features as F
from speccascade.deferral.heads import DeferralHead
from speccascade.errors import SpeccascadeError
from speccascade.outdir import MARKER, OutputDir
from tests.data.test_spec_bench import RECORDS, write_jsonl
from tests.training.test_train import planted_traces

TINY = ["--models", "tiny-random", "--wandb-mode", "disabled"]


def _manifest(directory: Path, **changes) -> Path:
    path = directory / traces.MANIFEST
    manifest = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(manifest))
    return directory


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dst


def _head(directory: Path, **config_changes) -> Path:
    DeferralHead(list(F.POSITION_FEATURES), hidden=8, depth=1, calibration={"method": "platt", "a": 1.0, "b": 0.0},
                 operating_points={"0.2": 0.7, "0.4": 0.6, "default": 0.5}).save(directory)
    if config_changes:
        config = json.loads((directory / "config.json").read_text()) | config_changes
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Good and broken trace directories and heads, and output directories of each command."""
    root = tmp_path_factory.mktemp("inputs")
    good = planted_traces(root / "good", examples=40, rows=5)
    paths = {"good": good, "file": root / "a-file.txt", "head": _head(root / "head")}
    paths["file"].write_text("not a directory")
    paths["schema"] = _manifest(_copy(good, root / "schema"), schema_version=99)
    paths["spec"] = _manifest(_copy(good, root / "spec"), feature_spec={"name": F.SPEC_NAME, "version": 1})
    paths["other-pair"] = _manifest(_copy(good, root / "other-pair"), drafter="a/small", target="a/large")
    paths["incomplete"] = _manifest(_copy(good, root / "incomplete"), complete=False)
    paths["list"] = _copy(good, root / "list")
    (paths["list"] / traces.MANIFEST).write_text("[1, 2]")
    paths["no-shards"] = _copy(good, root / "no-shards")
    (paths["no-shards"] / traces.MANIFEST).write_text(json.dumps({"schema_version": 1, "complete": True}))
    paths["damaged-manifest"] = _copy(good, root / "damaged-manifest")
    manifest = paths["damaged-manifest"] / traces.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:40])
    paths["garbage-shard"] = _copy(good, root / "garbage-shard")  # its checksum entry matches the garbage
    shard = paths["garbage-shard"] / traces.read_manifest(good)["shards"][0]["file"]
    shard.write_bytes(b"not parquet" * 100)
    shards = traces.read_manifest(good)["shards"]
    shards[0]["sha256"] = traces._sha256(shard)
    _manifest(paths["garbage-shard"], shards=shards)
    paths["damaged-marker"] = root / "damaged-marker"
    paths["damaged-marker"].mkdir()
    (paths["damaged-marker"] / MARKER).write_text('{"command": "train-deferral", "con')
    paths["invalid-json"] = _head(root / "invalid-json")
    (paths["invalid-json"] / "config.json").write_text('{"features": [')
    paths["operating-points"] = _head(root / "operating-points", operating_points={"0.2": "high"})
    paths["platt"] = _head(root / "platt", calibration={"method": "platt"})
    paths["features"] = _head(root / "features", features=list(F.POSITION_FEATURES[:-1]))
    paths["weights"] = _head(root / "weights", mean=[0.0] * 3, std=[1.0] * 3, features=list(F.POSITION_FEATURES[:3]))
    paths["truncated"] = _head(root / "truncated")
    weights = paths["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    paths["pickle"] = root / "pickle"
    paths["pickle"].mkdir()
    (paths["pickle"] / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with OutputDir(root / "evaluation", "evaluate", {"limit": 2}).claim() as claimed:
        claimed.finish()
    paths["evaluation"] = root / "evaluation"
    paths["spec-bench"] = write_jsonl(root / "question.jsonl", RECORDS)
    paths["bad-reference"] = write_jsonl(root / "bad-reference.jsonl", [
        {"question_id": 1, "category": "math_reasoning", "turns": ["q"], "reference": ["7"]}])
    return paths


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _cases(p: dict[str, Path], out: Path) -> list[tuple[list[str], str]]:
    """(argv, a part of the error message) for every defect of issue 14 that needs no model."""
    ev = ["evaluate", *TINY, "--out", str(out), "--limit", "2"]
    tr = ["train-deferral", "--traces", str(p["good"]), "--out", str(out), "--wandb-mode", "disabled"]
    lt = ["log-traces", "--models", "tiny-random", "--out", str(out), "--limit", "2"]
    name, deep = out / ("n" * 256), out.joinpath(*["d" * 250] * 17)  # a name, a path the file system cannot hold
    sb = ["--task", "spec-bench", "--data-file", str(p["spec-bench"])]
    return [
        (["evaluate", *TINY, "--out", str(name)], "a name of 256 bytes; the file system takes at most 255"),
        (["log-traces", *TINY, "--out", str(deep)], "bytes long; keep it to 3840"),
        (["train-deferral", "--traces", str(p["good"]), "--out", str(name)], "a name of 256 bytes"),
        (["compare", "--traces", str(p["good"]), "--out", str(deep)], "bytes long"),
        (["demo", *TINY, "--out", str(name)], "a name of 256 bytes"),
        (["bench", "--models", "tiny-random", "--out", str(deep)], "bytes long"),
        (["finetune", "--base", "tiny-random", "--out", str(name)], "a name of 256 bytes"),
        ([*tr, "--traces", str(name)], "trace directory /"),
        (["operating-point", "--traces", str(deep), "--rule", "opt", "--target-deferral-rate", "0.5"], "bytes long; keep it to 4095"),
        ([*ev, "--rules", f"learned:{name}"], "head directory /"),
        ([*ev, "--task", "gsm8k", "--data-file", str(name)], "--data-file /"),
        ([*ev, "--rules", "opt:abc"], "'abc' is not a number"),
        ([*ev, "--rules", f"learned:{p['head']}@notanumber"], "'notanumber' is not a number"),
        ([*ev, "--rules", "chow:nan"], "not NaN"),
        ([*ev, "--rules", ""], "--rules names nothing"),
        ([*ev, "--rules", ",,,"], "--rules names nothing"),
        ([*ev, "--rules", "opt,opt:0.5"], "opt:0.5 more than once"),
        ([*ev, "--rules", "always,,opt"], "empty item"),
        ([*ev, "--rules", "bogus"], "unknown rule 'bogus'"),
        ([*ev, "--rules", "always:0.5"], "rule 'always' takes no knob"),
        ([*ev, "--rules", "drafter:xyz"], "rule 'drafter' takes no knob"),
        ([*ev, "--rules", "exact:abc"], "rule 'exact' takes no knob"),
        ([*ev, "--rules", "target:0"], "rule 'target' takes no knob"),
        ([*ev, "--rules", "sequential:abc"], "'abc' is not a number"),
        ([*ev, "--rules", "kl:0.1:tau=2"], "tau in [0, 1]"),
        ([*ev, "--rules", "topk:inf"], "--rules: rule 'topk' needs a whole number k, got inf"),
        ([*lt, "--rule", "topk:-inf"], "--rule: rule 'topk' needs a whole number k, got -inf"),
        (["compare", "--traces", str(p["good"]), "--out", str(out), "--rules", "topk:inf"], "--rules: rule"),
        (["operating-point", "--traces", str(p["good"]), "--rule", "topk:nan", "--target-deferral-rate", "0.5"],
         "--rule: rule 'topk:nan': the knob must be a number, not NaN"),
        (["demo", *TINY, "--out", str(out), "--rules", "topk:inf"], "--rules: rule"),
        (["bench", "--models", "tiny-random", "--out", str(out), "--rules", "topk:inf"], "--rules: rule"),
        ([*ev, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ([*ev, "--limit", "-1"], "--limit must be >= 1"),
        ([*ev, "--temperature", "-1"], "--temperature must be >= 0"),
        ([*ev, "--temperature", "1e999"], "--temperature must be a finite number"),
        ([*ev, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        ([*ev, "--block-size", "0"], "--block-size must be >= 1"),
        ([*ev, "--margin", "-0.1"], "--margin must be >= 0"),
        ([*ev, "--seed", "-1"], "--seed must be >= 0"),
        ([*ev, "--seed", str(2**64)], f"--seed must be <= 4294967295, got {2**64}"),
        ([*ev, "--limit", str(10**20)], "--limit must be <= 10000000"),
        ([*lt, "--task", "arithmetic", "--limit", str(2**62)], "--limit must be <= 10000000"),  # generated until killed
        (["demo", *TINY, "--out", str(out), "--train-examples", str(2**62)], "--train-examples must be <= 10000000"),
        (["bench", "--models", "tiny-random", "--out", str(out), "--prompts", str(2**62)], "--prompts must be <= 10000000"),
        (["bench", "--models", "tiny-random", "--out", str(out), "--limit", "2"], "unrecognized arguments: --limit 2"),  # no prefix of --limit-per-category
        ([*lt, "--topk", str(2**63)], "--topk must be a 64-bit whole number"),
        ([*lt, "--seed", str(2**32)], "--seed must be <= 4294967295"),
        ([*tr, "--seed", str(2**64)], "--seed must be <= 4294967295"),
        (["compare", "--traces", str(p["good"]), "--out", str(out), "--seed", str(2**64)], "--seed must be <= 4294967295"),
        (["compare", "--traces", str(p["good"]), "--out", str(out), "--resamples", str(2**62)],
         f"--resamples must be <= 20000, got {2**62}"),  # was a numpy "array is too big", exit 1
        ([*ev, "--batch-size", str(10**20)], "--batch-size must be a 64-bit whole number"),
        ([*tr, "--batch-size", str(10**20)], "--batch-size must be a 64-bit whole number"),
        (["finetune", "--base", "tiny-random", "--out", str(out), "--batch-size", str(2**62)], "--batch-size must be <= 65536"),
        (["finetune", "--base", "tiny-random", "--out", str(out), "--examples", str(2**62)],
         f"finetune prepares its {2**62} training examples"),  # both generated examples until killed
        (["finetune", "--base", "tiny-random", "--out", str(out), "--steps", str(10**7), "--batch-size", "2"],
         "(--examples, else --steps x --batch-size) before the first step; at most 10000000"),
        (["demo", *TINY, "--out", str(out), "--seed", str(2**64)], "--seed must be <= 4294967295"),
        (["finetune", "--base", "tiny-random", "--out", str(out), "--seed", str(2**64)], "--seed must be <= 4294967295"),
        (["finetune", "--base", "tiny-random", "--out", str(out), "--eval-seed", str(2**32)], "--eval-seed must be <= 4294967295"),
        (["evaluate", "--models", "nope", "--out", str(out)], "unknown preset 'nope'"),
        (["evaluate", "--drafter", "x/y", "--out", str(out)], "--drafter needs --target"),
        ([*ev, "--task", "gsm8k", "--data-file", str(p["good"] / "missing.jsonl")], "not found"),
        ([*ev, "--wandb-project", " "], "--wandb-project must not be empty"),
        (["evaluate", *TINY, "--out", str(p["file"])], "is a file"),
        (["evaluate", *TINY, "--out", str(p["file"] / "sub")], "is a file, not a directory"),
        (["evaluate", *TINY, "--out", str(p["good"])], "was not written by speccascade evaluate"),
        (["evaluate", *TINY, "--out", str(p["evaluation"]), "--limit", "3"], "limit=2 (now 3)"),
        (["evaluate", *TINY, "--out", "/proc/speccascade-test", "--rules", "never", "--limit", "1"], "cannot create --out"),
        ([*ev, "--rules", f"learned:{p['invalid-json']}"], f"{p['invalid-json'] / 'config.json'} is damaged or not a speccascade file"),
        ([*ev, "--rules", f"learned:{p['operating-points']}"], "'operating_points' must map deferral rates to numeric"),
        ([*ev, "--rules", f"learned:{p['platt']}"], "Platt calibration needs numeric coefficients"),
        ([*ev, "--rules", f"learned:{p['features']}"], "features do not match its"),
        ([*ev, "--rules", f"learned:{p['weights']}"], "do not fit its config.json"),
        ([*ev, "--rules", f"learned:{p['truncated']}"], "model.safetensors is unreadable (truncated or corrupt)"),
        ([*ev, "--rules", f"learned:{p['pickle']}"], "is not a deferral head"),
        ([*tr, "--batch-size", "0"], "--batch-size must be >= 1"),
        ([*tr, "--devices", "0"], "--devices must be >= 1"),
        ([*tr, "--accelerator", "cuda"] if not _cuda() else [*tr, "--devices", "999", "--accelerator", "cuda"], "CUDA GPU"),
        ([*tr, "--lr", "-1"], "--lr must be > 0"),
        ([*tr, "--lr", "0"], "--lr must be > 0"),
        ([*tr, "--epochs", "0"], "--epochs must be >= 1"),
        ([*tr, "--hidden", "0"], "--hidden must be >= 1"),
        ([*tr, "--hidden", str(10**12)], "--hidden must be <= 4096, got 1000000000000"),
        ([*tr, "--depth", "1000000"], "--depth must be <= 8"),
        ([*tr, "--objective", "relaxed", "--alpha", "-5"], "--alpha must be >= 0"),
        ([*tr, "--objective", "relaxed", "--alpha-range", "[2, 0]"], "low <= high"),
        ([*tr, "--alpha-range", "[0, 1]"], "needs objective 'relaxed'"),
        ([*tr, "--val-fraction", "1"], "--val-fraction must be < 1"),
        ([*tr, "--features", "[q_top1, nope]"], "unknown: ['nope']"),
        ([*tr, "--features", "[]"], "--features names nothing"),
        ([*tr, "--features", "q_top1,"], "--features 'q_top1,' has an empty item"),
        (["finetune", "--base", "tiny-random", "--out", str(out), "--lora-targets", "[]"], "--lora-targets names nothing"),
        ([*tr, "--strategy", "bogus"], "unknown strategy 'bogus'"),
        ([*tr, "--traces", ","], "--traces names nothing"),
        ([*tr, "--traces", f"{p['good']}, {p['good']}"], "names a trace directory more than once"),
        ([*tr, "--traces", f"{p['good']},{p['other-pair']}"], "pass --mix-pairs"),
        ([*tr, "--traces", str(p["schema"])], "schema version 99"),
        ([*tr, "--traces", str(p["spec"])], f"feature spec {F.SPEC_NAME} v1"),
        ([*tr, "--traces", str(p["list"])], "a JSON object expected, got a list"),
        ([*tr, "--traces", str(p["no-shards"])], "it lists no shards"),
        ([*tr, "--traces", str(p["damaged-manifest"])], f"{p['damaged-manifest'] / traces.MANIFEST} is damaged or not a speccascade file"),
        ([*tr, "--traces", str(p["garbage-shard"])], "r000-00000.parquet is damaged or not a speccascade file ("),
        ([*tr, "--out", str(p["damaged-marker"])], f"{p['damaged-marker'] / MARKER} is damaged or not a speccascade file"),
        ([*tr, "--traces", str(p["incomplete"])], "are incomplete"),
        ([*tr, "--out", str(p["evaluation"])], "holds the output of `speccascade evaluate`"),
        ([*tr, "--out", str(p["file"])], "is a file"),
        ([*lt, "--mode", "on-policy", "--temperature", "-1"], "--temperature must be >= 0"),
        ([*lt, "--topk", "-3"], "--topk must be >= 0"),
        ([*lt, "--task", "nope"], "unknown task 'nope'"),
        ([*lt, "--devices", "0"], "--devices must be >= 1"),
        ([*lt, "--rule", "opt:x"], "'x' is not a number"),
        ([*lt, "--out", str(p["head"])], "was not written by speccascade log-traces"),
        ([*ev, *sb, "--categories", "chat"], "unknown category 'chat' (--categories); Spec-Bench's are mt_bench, "),
        ([*ev, *sb, "--categories", "qa,rag,qa"], "--categories names 'qa' more than once"),
        ([*ev, *sb, "--limit-per-category", "0"], "--limit-per-category must be >= 1, got 0"),
        ([*ev, "--task", "spec-bench", "--data-file", str(p["bad-reference"])],
         "bad-reference.jsonl:1: field 'reference' of a math_reasoning record does not end with '#### N'"),
        (["bench", "--models", "tiny-random", "--out", str(out), *sb, "--categories", "rag,rag"], "names 'rag' more than once"),
        ([*lt, *sb], "spec-bench has one split, 'test', not 'train'"),
        ([*lt, *sb, "--split", "test", "--limit-per-category", "0"], "--limit-per-category must be >= 1, got 0"),
        ([*lt, *sb, "--split", "test", "--categories", "summarization,qa"],
         "--mode reference teacher-forces a gold reply, but 1 of the 2 spec-bench examples have none"),
        ([*lt, "--categories", "qa"], "--categories and --limit-per-category need a task with categories (spec-bench)"),
        (["demo", *TINY, "--out", str(out), "--rules", "bogus"], "unknown rule 'bogus'"),
        (["demo", *TINY, "--out", str(out), "--eval-examples", "-1"], "--eval-examples must be >= 1"),
        (["operating-point", "--traces", str(p["good"]), "--rule", "opt", "--target-deferral-rate", "1.5"], "in [0, 1]"),
        (["compare", "--traces", str(p["damaged-manifest"]), "--out", str(out)],
         f"{p['damaged-manifest'] / traces.MANIFEST} is damaged or not a speccascade file"),
        (["compare", "--traces", str(p["garbage-shard"]), "--out", str(out)],
         f"{p['garbage-shard'] / traces.read_manifest(p['good'])['shards'][0]['file']} is damaged or not a speccascade file"),
        (["operating-point", "--traces", str(p["list"]), "--rule", "opt", "--target-deferral-rate", "0.5"], "JSON object"),
        # parser errors: one line and a pointer to --help
        ([*ev, "--block-size", "abc"], "--block-size: expected an int >= 1, got abc; see `speccascade evaluate --help`"),
        ([*ev, "--wandb-mode", "bogus"], "--wandb-mode: expected one of offline, online, disabled or null, got bogus"),
        # union-typed settings: the flag and every accepted form
        ([*ev, "--limit", "abc"], "--limit: expected an int >= 1 and <= 10000000 or null, got abc; see `speccascade evaluate --help`"),
        ([*tr, "--patience", "1.5"], "--patience: expected an int >= 1 or null, got 1.5"),
        ([*tr, "--alpha-range", "[1]"], "--alpha-range: expected a list of 2 numbers >= 0 or null, got [1]"),
        (["operating-point", "--traces", str(p["good"]), "--rule", "opt", "--target-loss", "low"],
         "--target-loss: expected a number or null, got low"),
        (["finetune", "--base", "tiny-random", "--out", str(out), "--examples", "many"],
         "--examples: expected an int >= 1 or null, got many"),
        ([*tr, "--accelerator", "bogus"], "--accelerator: expected one of auto, cpu, cuda, gpu, mps"),
        ([*lt, "--mode", "offline"], "--mode: expected one of reference, on-policy"),
        ([*ev, "--block_size", "3"], "options are spelled with dashes"),
        (["evaluatex"], "see `speccascade --help`"),
    ]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_bad_input_table(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    before = _tree(inputs["good"].parent)
    for argv, message in _cases(inputs, out):
        code = main(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, (argv, err)
        assert len(errors) == 1 and message in errors[0], (argv, err)
        assert "Traceback" not in err, argv
        assert not out.exists() and _tree(inputs["good"].parent) == before, f"{argv} left files behind"


@pytest.mark.parametrize("command, flag, resolve", [
    ("train-deferral", "--features", "speccascade.training.train"), ("finetune", "--lora-targets", "speccascade.finetune.train")])
def test_a_list_setting_takes_one_element(inputs, tmp_path, command, flag, resolve):
    """``--features q_top1`` is a one-element list (the parser refused it); settings resolve, nothing is trained."""
    import importlib

    from speccascade.cli import COMMANDS, build_parser

    given = {"--features": "q_top1", "--lora-targets": "q_proj"}[flag]
    argv = [command, "--out", str(tmp_path / "out"), flag, given, "--wandb-mode", "disabled"]
    cfg = build_parser().parse_args(argv + (["--traces", str(inputs["good"])] if command == "train-deferral" else ["--lora-rank", "4"]))
    settings = COMMANDS[command][1](**{k: v for k, v in cfg[command].as_dict().items() if k != "config"})
    importlib.import_module(resolve).resolve(settings)
    assert getattr(settings, flag[2:].replace("-", "_")) == [given]


def test_a_topk_beyond_the_vocabulary_is_refused_once_the_pair_is_known(tmp_path, capsys):
    """The vocabulary's size is known once the pair loads: a larger --topk is refused there, before a row is logged."""
    out = tmp_path / "out"
    code = main(["log-traces", *TINY, "--out", str(out), "--limit", "1", "--topk", "100000"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "--topk 100000 is more than the vocabulary" in errors[0], errors
    assert not out.exists()


def test_an_unexpected_exception_is_one_named_line_with_the_traceback_behind_verbose(monkeypatch, tmp_path, capsys):
    def broken(**_):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setitem(__import__("speccascade.cli", fromlist=["COMMANDS"]).COMMANDS, "operating-point",
                        (broken, None))
    from speccascade import cli

    assert cli.run("operating-point", {}) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: RuntimeError: disk on fire second line (run with -v for the traceback)"
    assert cli.run("operating-point", {}, verbose=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error: RuntimeError: disk on fire second line"


def test_degenerate_heads_are_not_exported(tmp_path, capsys):
    """Constant inputs give a constant score; a huge learning rate gives non-finite ones: neither is a head."""
    constant = planted_traces(tmp_path / "constant", examples=40, rows=5)
    table = traces.load_traces(constant).to_pandas()
    for name in F.POSITION_FEATURES:
        table[name] = 0.5
    for path in (constant / "shards").glob("*"):
        path.unlink()
    traces.ShardWriter(constant, 0).write({c: table[c].to_numpy() for c in table.columns}, sorted(set(table["example_id"])))
    traces.write_manifest(constant, {"config": {}, "feature_spec": F.spec()}, complete=True)
    for traces_dir, extra, message in ((constant, [], "same score"),
                                       (planted_traces(tmp_path / "planted", examples=40, rows=5), ["--lr", "1e30"], "not finite")):
        out = tmp_path / f"head-{traces_dir.name}"
        capsys.readouterr()
        code = main(["train-deferral", "--traces", str(traces_dir), "--out", str(out), "--epochs", "2", "--batch-size", "64",
                     "--wandb-mode", "disabled", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.strip().startswith("error: ") and message in err and "no head exported" in err
        assert not out.exists()  # no checkpoint, no plot, no config: nothing left behind


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "speccascade.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])


def test_real_command_line(inputs, tmp_path):
    out = tmp_path / "out"
    for args, code, message in (
        (["evaluate", *TINY, "--out", str(out), "--rules", "opt:abc"], 2, "'abc' is not a number"),
        (["train-deferral", "--traces", str(inputs["good"]), "--out", str(out), "--block-size", "abc"], 2,
         "see `speccascade train-deferral --help`"),
    ):
        proc = _cli(*args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == code and len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout and "usage:" not in proc.stderr
        assert not out.exists()
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"speccascade {__version__}"


def test_python_api_checks_the_same_settings(tmp_path):
    from speccascade.evaluation.evaluate import evaluate

    with pytest.raises(SpeccascadeError, match="--batch-size must be >= 1"):
        evaluate(tmp_path / "x", models="tiny-random", batch_size=0)
    with pytest.raises(SpeccascadeError, match="--limit must be an int"):
        evaluate(tmp_path / "x", models="tiny-random", limit="ten")
    assert not (tmp_path / "x").exists()


def _hidden_traces(directory: Path, width: int) -> Path:
    """Planted traces with both models' hidden states, ``width`` wide."""
    planted_traces(directory, examples=20, rows=5)
    table = traces.load_traces(directory).to_pandas()
    columns = {c: table[c].to_numpy() for c in table.columns}
    rng = np.random.default_rng(width)
    columns |= {name: rng.random((len(table), width)).astype(np.float16) for name in ("q_hidden", "p_hidden")}
    for path in (directory / "shards").glob("*"):
        path.unlink()
    traces.ShardWriter(directory, 0).write(columns, sorted(set(table["example_id"])))
    traces.write_manifest(directory, {"config": {}, "feature_spec": F.spec()}, complete=True)
    return directory


@pytest.fixture(scope="module")
def mismatched(inputs, tmp_path_factory) -> dict[str, Path]:
    """Heads that cannot read the tiny-random pair or the traces, and traces with hidden states of two widths."""
    root = tmp_path_factory.mktemp("mismatched")
    scalars = list(F.POSITION_FEATURES)
    paths = {"hidden-head": root / "hidden-head", "token-head": root / "token-head", "schema-head": root / "schema-head"}
    DeferralHead(scalars + ["q_hidden", "p_hidden"], hidden=8, depth=1, mean=[0.0] * (len(scalars) + 16),
                 std=[1.0] * (len(scalars) + 16)).save(paths["hidden-head"])  # reads 8-wide hidden states
    DeferralHead(scalars + list(F.TOKEN_FEATURES), hidden=8, depth=1,
                 provenance={"traces": [{"tokenizer": "another-vocabulary"}]}).save(paths["token-head"])
    DeferralHead(scalars, hidden=8, depth=1, provenance={"traces": [{"schema_version": 0}]}).save(paths["schema-head"])
    assert main(["log-traces", "--models", "tiny-random", "--out", str(root / "pair-traces"), "--limit", "2",
                 "--hidden-states", "both", "--wandb-mode", "disabled"]) == 0  # the pair's 64-wide hidden states
    paths |= {"pair-traces": root / "pair-traces", "narrow": _hidden_traces(root / "narrow", 4),
              "wide": _hidden_traces(root / "wide", 6)}
    return paths


def _compatibility_cases(p: dict[str, Path], m: dict[str, Path], out: Path) -> list[tuple[list[str], str]]:
    """(argv, a part of the error) of a head, traces or a pair that do not fit together, in every command."""
    widths = "reads hidden states of width q_hidden 8, p_hidden 8"
    op = ["operating-point", "--target-deferral-rate", "0.5"]
    return [
        (["evaluate", *TINY, "--out", str(out), "--limit", "1", "--rules", f"learned:{m['hidden-head']}"],
         f"{widths}; pair 'tiny-random' gives q_hidden 64, p_hidden 64"),
        (["log-traces", *TINY, "--out", str(out), "--limit", "1", "--mode", "on-policy", "--rule", f"learned:{m['hidden-head']}"],
         f"{widths}; pair 'tiny-random' gives q_hidden 64, p_hidden 64"),
        (["compare", "--traces", str(m["pair-traces"]), "--out", str(out), "--heads", str(m["hidden-head"])],
         f"{widths}; traces in {m['pair-traces']} give q_hidden 64, p_hidden 64"),
        (["compare", "--traces", str(p["good"]), "--out", str(out), "--heads", str(m["hidden-head"])],
         "give q_hidden none, p_hidden none (log them with --hidden-states both)"),
        ([*op, "--traces", str(m["pair-traces"]), "--rule", f"learned:{m['hidden-head']}"],
         f"{widths}; traces in {m['pair-traces']} give q_hidden 64"),
        (["train-deferral", "--traces", f"{m['narrow']},{m['wide']}", "--head", "hidden-mlp", "--out", str(out)],
         f"q_hidden differs in width between the trace directories (traces in {m['narrow']}: 4; traces in {m['wide']}: 6)"),
        (["train-deferral", "--traces", str(p["good"]), "--head", "hidden-mlp", "--out", str(out)],
         f"the head reads q_hidden, which traces in {p['good']} do not hold"),
        (["evaluate", *TINY, "--out", str(out), "--limit", "1", "--rules", f"learned:{m['token-head']}"],
         "reads token features over the vocabulary of tokenizer another-vocabulary; pair 'tiny-random' is of tokenizer"),
        (["compare", "--traces", str(p["good"]), "--out", str(out), "--heads", str(m["schema-head"])],
         f"was trained on traces of schema version 0; traces in {p['good']} have schema version 1"),
        (["compare", "--traces", str(p["schema"]), "--out", str(out)], "have schema version 99"),
        (["compare", "--traces", str(p["spec"]), "--out", str(out)], f"feature spec {F.SPEC_NAME} v1"),
        ([*op, "--traces", str(p["schema"]), "--rule", "opt"], "have schema version 99"),
        ([*op, "--traces", str(p["spec"]), "--rule", "opt"], f"feature spec {F.SPEC_NAME} v1"),
    ]


def test_a_head_that_cannot_read_its_inputs_is_refused_by_every_command(inputs, mismatched, tmp_path):
    """Item 2 of issue 27, through the real command line: one line naming both sides, exit 2, nothing written."""
    out = tmp_path / "out"
    before = _tree(inputs["good"].parent) | _tree(mismatched["pair-traces"].parent)
    for argv, message in _compatibility_cases(inputs, mismatched, out):
        proc = _cli(*argv, "--wandb-mode", "disabled") if argv[0] != "operating-point" else _cli(*argv)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (argv, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout, argv
        assert not out.exists(), f"{argv} left {out} behind"
    assert _tree(inputs["good"].parent) | _tree(mismatched["pair-traces"].parent) == before


def _one_error(proc: subprocess.CompletedProcess, code: int, message: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == code and len(errors) == (code != 0) and all(message in e for e in errors), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_compare_bench_and_demo_take_the_marker_and_the_lock(inputs, tmp_path):
    """Item 5 of issue 27: compare, bench and demo refuse another command's directory, and compare (the quick one)
    refuses its own finished run without --resume or --overwrite, and a directory being written."""
    import fcntl

    from speccascade.outdir import LOCK

    foreign, before = inputs["evaluation"], _tree(inputs["evaluation"])
    for argv in (["compare", "--traces", str(inputs["good"]), "--resamples", "10"],
                 ["bench", "--models", "tiny-random", "--prompts", "1", "--batch-sizes", "1"], ["demo", *TINY]):
        _one_error(_cli(*argv, "--out", str(foreign)), 2, "holds the output of `speccascade evaluate`")
        assert _tree(foreign) == before, argv
    out = tmp_path / "compare"
    argv = ["compare", "--traces", str(inputs["good"]), "--out", str(out), "--resamples", "10", "--wandb-mode", "disabled"]
    _one_error(_cli(*argv), 0, "")
    marker, written = json.loads((out / MARKER).read_text()), (out / "compare.json").read_bytes()
    assert marker["command"] == "compare" and marker["complete"]
    _one_error(_cli(*argv), 2, "already holds a finished run of these settings; pass --resume")
    _one_error(_cli(*argv, "--seed", "1"), 2, "was written with a different configuration: seed=0 (now 1)")
    resumed = _cli(*argv, "--resume")
    _one_error(resumed, 0, "")
    assert "holds this comparison; nothing to do" in resumed.stdout
    assert (out / "compare.json").read_bytes() == written
    with open(out / LOCK, "w") as held:  # another writer holds the directory
        fcntl.flock(held, fcntl.LOCK_EX)
        _one_error(_cli(*argv, "--overwrite"), 2, "is being written by pid")
    _one_error(_cli(*argv, "--overwrite"), 0, "")
    assert not (out / LOCK).exists()


def test_finetune_checks_every_setting_before_it_writes(tmp_path):
    """Item 6 of issue 27: a bad teacher, evaluation split or LoRA setting is refused before training, not after
    it (the directory stayed behind), through the real command line."""
    out = tmp_path / "out"
    ft = ["finetune", "--base", "tiny-random", "--out", str(out), "--steps", "1", "--eval-examples", "1", "--wandb-mode", "disabled"]
    for extra, message in (
        (["--teacher", str(tmp_path / "no-such-model")], f"--teacher {tmp_path / 'no-such-model'}: cannot load model"),
        (["--teacher", "tiny-random-t5"], "--teacher tiny-random-t5: finetune trains decoder-only models"),
        (["--base", "tiny-random-t5"], "--base tiny-random-t5: finetune trains decoder-only models"),
        (["--eval-split", "bogus"], "--eval-split bogus: unknown split 'bogus' for arithmetic"),
        (["--lora-targets", "q_proj"], "--lora-targets names the modules LoRA adapts; it needs --lora-rank > 0"),
        (["--max-new-tokens", str(2**62)], f"--max-new-tokens {2**62} does not fit the context of"),  # once the model loads
    ):
        _one_error(_cli(*ft, *extra), 2, message)
        assert not out.exists(), f"{extra} left {out} behind"
