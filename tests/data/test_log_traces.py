"""``log-traces`` on tiny-random: both modes, rules recomputed from columns, multi-process, kill + resume."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datasets import load_dataset

from speccascade.cli import main
from speccascade.data import traces
from speccascade.tracing.log_traces import log_traces
from speccascade.data.schema import ID_COLUMNS, ON_POLICY_LABELS, ORACLE_LABELS, REFERENCE_LABELS
from speccascade.deferral import features as F
from speccascade.deferral import rules
from speccascade.errors import SpeccascadeError
from speccascade.outdir import MARKER

TINY = dict(models="tiny-random", task="arithmetic", limit=6, batch_size=4, shard_examples=2, topk=4)


def read_rows(directory: Path):
    manifest = traces.read_manifest(directory)
    files = [str(directory / s["file"]) for s in manifest["shards"]]
    return manifest, load_dataset("parquet", data_files=files, split="train")


def sorted_rows(directory: Path) -> dict[tuple[str, int, int, int], dict]:
    """Rows by what makes one unique: example, turn, block start and position in the block."""
    _, rows = read_rows(directory)
    keyed = {(r["example_id"], r.get("turn", 0), r["position"] - r["position_in_block"], r["position_in_block"]): r
             for r in rows}
    assert len(keyed) == len(rows)
    return keyed


def assert_same_rows(a: Path, b: Path) -> None:
    ra, rb = sorted_rows(a), sorted_rows(b)
    assert ra.keys() == rb.keys()
    for key, row in ra.items():
        for name, value in row.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert rb[key][name] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), (key, name)
            else:
                assert rb[key][name] == value, (key, name)


@pytest.mark.parametrize("mode", ["reference", "on-policy"])
def test_both_modes_write_readable_shards_with_the_stated_rows(tmp_path, mode):
    out = tmp_path / mode
    manifest = log_traces(out, mode=mode, max_new_tokens=12, hidden_states="both", **TINY)
    assert manifest["complete"] and manifest["examples"] == 6 and len(manifest["shards"]) == 3
    assert manifest["feature_spec"]["version"] == F.SPEC_VERSION and manifest["tokenizer"]
    on_disk, rows = read_rows(out)
    assert on_disk == manifest and rows.num_rows == manifest["rows"] > 0
    assert set(ID_COLUMNS) | set(F.ALL_FEATURES) | set(ORACLE_LABELS) <= set(rows.column_names)
    assert set(rows["turn"]) == {0}  # single-turn examples
    assert len(rows[0]["q_hidden"]) == len(rows[0]["p_hidden"]) == 64 and len(rows[0]["q_topk_ids"]) == 4
    table = rows.with_format("torch")[:]
    assert ((table["soft_accept"] >= 0) & (table["soft_accept"] <= 1)).all()
    assert ((table["tv"] >= 0) & (table["tv"] <= 1 + 1e-6)).all()
    if mode == "reference":
        assert set(REFERENCE_LABELS) <= set(rows.column_names)
        torch.testing.assert_close(table["gap"], table["loss_q"] - table["loss_p"])
        assert (table["draft_token"] == torch.tensor([r for r in table["q_topk_ids"][:, 0].tolist()])).all()
    else:
        assert set(ON_POLICY_LABELS) <= set(rows.column_names)
        assert table["deferred"][table["examined"]].all()  # `always` defers every examined draft
        assert not (table["accepted"] & ~table["examined"]).any()


@pytest.mark.parametrize("spec", ["chow:0.9", "diff:0.05", "opt:-0.05", "bild:0.5", "tokenv1:0", "tokenv2:0.02", "tokenv3:0.5", "topk:3"])
def test_fixed_rules_recomputed_from_columns_match_the_decoder(tmp_path, spec):
    log_traces(tmp_path, mode="on-policy", rule=spec, temperature=1.0, max_new_tokens=16, **TINY)
    table = read_rows(tmp_path)[1].with_format("torch")[:]
    decided = rules.parse(spec).build().decide({name: table[name] for name in F.ALL_FEATURES})
    assert torch.equal(decided, table["deferred"])
    assert 0 < int(table["deferred"].sum()) < len(table["deferred"])  # the rule really chose both ways


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "speccascade.cli", "log-traces", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def cli_args(out: Path, limit: int, extra: list[str] = ()) -> list[str]:
    return ["--out", str(out), "--models", "tiny-random", "--task", "arithmetic", "--limit", str(limit),
            "--mode", "on-policy", "--max-new-tokens", "24", "--batch-size", "2", "--shard-examples", "2",
            "--temperature", "1.0", "--topk", "4", "--accelerator", "cpu", *extra]


def test_two_processes_write_the_rows_of_one(tmp_path):
    one = run_cli(cli_args(tmp_path / "one", 8))
    assert one.wait(timeout=300) == 0, one.stdout.read()
    two = run_cli(cli_args(tmp_path / "two", 8, ["--devices", "2"]))
    assert two.wait(timeout=300) == 0, two.stdout.read()
    assert two.stdout.read().count(f"log-traces: wrote {tmp_path / 'two'}") == 1  # rank 0 alone says what was written
    manifest = traces.read_manifest(tmp_path / "two")
    assert {Path(s["file"]).name[:4] for s in manifest["shards"]} == {"r000", "r001"}  # both ranks wrote
    assert_same_rows(tmp_path / "one", tmp_path / "two")


def test_processes_share_cycling_kinds_and_a_resumed_remainder_evenly():
    """Examples whose kind takes turns (the arithmetic levels, 1 + i % 4, cost about their level) are split so that
    two processes get about equal work, not levels 1 and 3 against 2 and 4 (1.5 times the work) as a split by
    parity did; what a resumed run has left (here the odd examples, after one process finished the even ones) is
    split between both again; each part keeps the examples' order and the parts are the whole, once."""
    from speccascade.tracing.log_traces import share

    todo = [(i, f"ex-{i}") for i in range(128)]
    for left in (todo, todo[1::2]):
        parts = [share(left, rank, 2) for rank in range(2)]
        assert sorted(parts[0] + parts[1]) == left and all(part == sorted(part) for part in parts)
        assert abs(len(parts[0]) - len(parts[1])) <= 1
        work = [sum(1 + i % 4 for i, _ in part) for part in parts]
        assert max(work) <= 1.15 * min(work), work
    assert share(todo, 0, 1) == todo


def test_ranks_wait_at_the_end_longer_than_the_collectives_half_hour():
    """A rank whose share ends first waits for the others at the end; with the collectives' default of 30 minutes
    a share of outcome labels 30 minutes longer than another's ended a healthy run (rank 0 timed out)."""
    from datetime import timedelta

    from speccascade.launch import RANK_WAIT, strategy

    assert strategy(1) == "auto" and RANK_WAIT >= timedelta(hours=12)
    assert strategy(2)._timeout == RANK_WAIT  # lightning_fabric's DDPStrategy keeps it there


def test_the_command_ends_by_saying_what_it_logged_and_where(tmp_path, capsys):
    out = tmp_path / "ref"
    args = ["log-traces", "--out", str(out), "--models", "tiny-random", "--task", "arithmetic", "--limit", "6", "--batch-size",
            "4", "--shard-examples", "2", "--topk", "0", "--wandb-mode", "disabled"]
    assert main(args) == 0
    manifest, rows = read_rows(out)
    gap = rows.with_format("numpy")[:]["gap"]
    summary = [f"log-traces: 6 examples, {rows.num_rows} positions (rows) in 3 shards, reference mode; mean gap "
               f"(loss_q - loss_p) {gap.mean():.4f}, drafter worse than the target at {(gap > 0).mean():.0%} of positions",
               f"log-traces: wrote {out} (manifest.json, shards/)"]
    assert manifest["rows"] == rows.num_rows and capsys.readouterr().out.splitlines()[-2:] == summary
    assert main([*args, "--resume"]) == 0  # nothing left to log: the same summary
    assert capsys.readouterr().out.splitlines()[-3:] == [f"log-traces: {out} holds complete traces of these settings; "
                                                         "nothing to do", *summary]


def test_bad_input_fails_clearly_and_leaves_no_complete_looking_output(tmp_path):
    with pytest.raises(SpeccascadeError, match="unknown task 'nope'"):
        log_traces(tmp_path / "a", models="tiny-random", task="nope")
    with pytest.raises(SpeccascadeError, match="not found"):
        log_traces(tmp_path / "b", models="tiny-random", task="gsm8k", data_file=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(SpeccascadeError, match=r"bad.jsonl:2"):
        log_traces(tmp_path / "c", models="tiny-random", task="gsm8k", data_file=str(bad))
    assert not any((tmp_path / d).exists() for d in "abc")
    with pytest.raises(SpeccascadeError, match="unknown mode"):
        log_traces(tmp_path / "d", models="tiny-random", mode="offline")
    done = tmp_path / "done"
    log_traces(done, mode="reference", **TINY)
    before = traces.read_manifest(done)
    with pytest.raises(SpeccascadeError, match=r"different configuration: limit=6 \(now 5\)"):
        log_traces(done, mode="reference", **(TINY | {"limit": 5}), resume=True)
    assert traces.read_manifest(done) == before


def test_cli_error_is_one_line(tmp_path):
    proc = run_cli(["--out", str(tmp_path / "x"), "--models", "tiny-random", "--task", "nope"])
    assert proc.wait(timeout=120) == 2
    assert proc.stdout.read().strip().splitlines()[-1] == "error: unknown task 'nope'; known: " + ", ".join(
        __import__("speccascade.data", fromlist=["TASKS"]).TASKS
    )


def test_traces_logged_before_markers_existed_resume_and_other_settings_are_refused(tmp_path):
    """A directory of an older release (manifest and shards, no marker) continues with --resume to the rows of an
    uninterrupted run; the manifest's configuration guards it like a marker's."""
    full, old = tmp_path / "full", tmp_path / "old"
    log_traces(full, **TINY)
    log_traces(old, **(TINY | {"limit": 2}))  # a first shard, as an interrupted older run would have left
    manifest = json.loads((old / traces.MANIFEST).read_text())
    manifest["config"]["limit"], manifest["complete"] = 6, False
    (old / traces.MANIFEST).write_text(json.dumps(manifest))
    (old / MARKER).unlink()
    with pytest.raises(SpeccascadeError, match=r"topk=4 \(now 8\)"):
        log_traces(old, **(TINY | {"topk": 8}), resume=True)
    log_traces(old, **TINY, resume=True)
    assert traces.read_manifest(old)["complete"]
    assert_same_rows(full, old)


def drop_turn(directory: Path) -> None:
    """Make traces look begun before log-traces wrote ``turn``: their shards without it, checksums to match."""
    manifest = json.loads((directory / traces.MANIFEST).read_text())
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        pq.write_table(pq.read_table(path).drop_columns(["turn"]), path)
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        sidecar = path.with_suffix(".json")
        sidecar.write_text(json.dumps(json.loads(sidecar.read_text()) | {"sha256": shard["sha256"]}))
    (directory / traces.MANIFEST).write_text(json.dumps(manifest))


def test_a_run_begun_before_the_turn_column_resumes_to_shards_without_it(tmp_path):
    """Shards added to traces begun before ``turn`` was written leave it out too (turn 0 everywhere: single-turn),
    so the traces read as one table, with turn 0, and hold the rows of an uninterrupted run."""
    full, old = tmp_path / "full", tmp_path / "old"
    log_traces(full, **TINY)
    log_traces(old, **(TINY | {"limit": 2}))  # a first shard, as an interrupted older run would have left
    drop_turn(old)
    manifest = json.loads((old / traces.MANIFEST).read_text())
    manifest["config"]["limit"], manifest["complete"] = 6, False
    (old / traces.MANIFEST).write_text(json.dumps(manifest))
    (old / MARKER).unlink()
    log_traces(old, **TINY, resume=True)
    manifest = traces.read_manifest(old)
    assert manifest["complete"] and len(manifest["shards"]) == 3
    assert all("turn" not in pq.read_schema(old / s["file"]).names for s in manifest["shards"])
    assert set(traces.load_traces(old)["turn"]) == {0}
    assert_same_rows(old, full)  # every column of the older shards, row for row


def test_rows_of_a_later_turn_cannot_join_shards_without_turn(tmp_path):
    """A later turn's rows cannot be written as turn 0 among older shards (whose positions counted on): refused."""
    row = {"example_id": np.array(["a", "a"], dtype=object), "position": np.array([0, 0])}
    traces.ShardWriter(tmp_path, rank=0).write(row, ["a"])  # a shard of a run begun before turn was written
    writer = traces.ShardWriter(tmp_path, rank=1)
    assert writer.write(row | {"turn": np.array([0, 0])}, ["b"]) == 2  # turn 0: written as the older shards are
    assert "turn" not in pq.read_schema(tmp_path / traces.SHARDS / "r001-00000.parquet").names
    with pytest.raises(SpeccascadeError, match=r"begun before log-traces wrote 'turn' .* log them again \(--overwrite\)$"):
        writer.write(row | {"turn": np.array([0, 1])}, ["c"])
