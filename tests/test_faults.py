"""Fault injection: SIGKILL at random points of log-traces and evaluate, then --resume; damaged shards and
sidecars, then --resume; SIGKILL and SIGINT during training, then --resume; a second writer refused while the
first holds the directory."""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from speccascade.cli import main
from speccascade.data import traces
from speccascade.tracing.log_traces import log_traces
from speccascade.errors import SpeccascadeError
from speccascade.evaluation.evaluate import evaluate
from speccascade.outdir import LOCK, MARKER
from speccascade.training.train import KeepBest
from tests.data.test_log_traces import TINY, assert_same_rows, cli_args
from tests.training.test_train import planted_traces

ROOT = Path(__file__).parents[1]
EVALUATE = dict(models="tiny-random", limit=4, max_new_tokens=8, block_size=3, rules="always,never,opt,chow",
                wandb_mode="disabled")
TIMING = ("wall_s", "relative_latency")


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "speccascade.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_interruptible)


def _interruptible() -> None:
    """A child of a background job inherits an ignored SIGINT; give it the default so Ctrl-C reaches it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Until ``path`` exists (True) or the process ends (False)."""
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return path.exists()


def _wait_for_owner(directory: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Until ``proc`` holds the directory's lock (True) or ends (False)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            if json.loads((directory / LOCK).read_text()).get("pid") == proc.pid:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return False


@contextmanager
def _paused(proc: subprocess.Popen) -> Iterator[None]:
    """Stop ``proc`` (SIGSTOP) while the body runs: a lock it holds stays held however long the body takes."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def _ended(proc: subprocess.Popen, what: str) -> str:
    """A failure message with the process's exit code and output (it is killed first if still running)."""
    alive = proc.poll() is None
    if alive:
        proc.kill()
    return f"{what}: pid {proc.pid} {'was still running' if alive else f'had exited {proc.returncode}'}; " \
           f"its output:\n{proc.communicate()[0]}"


def _flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_log_traces_killed_at_random_points_resumes_to_the_uninterrupted_rows(tmp_path, capsys):
    full = tmp_path / "full"
    log_traces(full, mode="on-policy", temperature=1.0, max_new_tokens=24, **(TINY | {"limit": 16}))
    killed = tmp_path / "killed"
    proc = _start("log-traces", *cli_args(killed, 16))
    assert _wait_for_owner(killed, proc)
    with _paused(proc):  # a second writer is refused
        assert main(["log-traces", *cli_args(killed, 16, ["--resume"])]) == 2
    assert f"is being written by pid {proc.pid}" in capsys.readouterr().err
    _wait_for(killed / "shards" / "r000-00000.json", proc)  # killed after its first shard
    proc.kill()
    proc.wait()
    assert not traces.read_manifest(killed)["complete"], "the run finished before it was killed; make it longer"
    with pytest.raises(SpeccascadeError, match="pass --resume"):
        log_traces(killed, mode="on-policy", temperature=1.0, max_new_tokens=24, **(TINY | {"limit": 16}))
    again = _start("log-traces", *cli_args(killed, 16, ["--resume"]))  # killed at a random moment of the resumed run
    _wait_for_owner(killed, again)
    time.sleep(random.Random(14).uniform(0.0, 1.5))
    again.kill()
    output = again.communicate()[0]
    final = _start("log-traces", *cli_args(killed, 16, ["--resume"]))
    output += final.communicate(timeout=300)[0]
    assert final.returncode == 0, output
    assert "taking over a stale lock of pid" in output  # reported, then taken over
    assert traces.read_manifest(killed)["complete"] and not (killed / LOCK).exists()
    assert_same_rows(full, killed)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """Traces of 6 examples in 3 shards, logged without interruption."""
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    assert main(["log-traces", *cli_args(full, 6)]) == 0
    return full


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _interrupted(directory: Path) -> None:
    """Leave ``directory`` as a run killed before its last shard: that shard gone, marker and manifest unfinished."""
    for path in (directory / "shards").glob("r000-00002.*"):
        path.unlink()
    for name in (MARKER, traces.MANIFEST):
        record = json.loads((directory / name).read_text())
        (directory / name).write_text(json.dumps(record | {"complete": False}))


@pytest.mark.parametrize("damage, file", [(_truncate, "r000-00000.parquet"), (_flip_a_bit, "r000-00001.parquet"),
                                          (_truncate, "r000-00000.json")], ids=["truncated", "bit-flipped", "sidecar"])
def test_log_traces_resume_relogs_damaged_shards(uninterrupted, tmp_path, capsys, damage, file):
    """An interrupted run with a damaged shard or sidecar resumes to the rows of an uninterrupted run."""
    out = tmp_path / "damaged"
    assert main(["log-traces", *cli_args(out, 6)]) == 0
    _interrupted(out)
    damage(out / "shards" / file)
    assert main(["log-traces", *cli_args(out, 6, ["--resume"])]) == 0
    assert f"shards/{Path(file).stem}." in capsys.readouterr().err
    assert traces.read_manifest(out)["complete"] and len(traces.read_manifest(out)["shards"]) == 3
    assert_same_rows(uninterrupted, out)


def test_log_traces_resume_of_finished_traces_relogs_a_damaged_shard(uninterrupted, tmp_path, capsys):
    """Finished traces with a truncated shard and a damaged manifest are no longer finished: --resume logs that
    shard's examples again and writes the manifest again."""
    out = tmp_path / "finished"
    assert main(["log-traces", *cli_args(out, 6)]) == 0
    _truncate(out / "shards" / "r000-00001.parquet")
    _truncate(out / traces.MANIFEST)
    assert main(["log-traces", *cli_args(out, 6, ["--resume"])]) == 0
    err = capsys.readouterr().err
    assert "r000-00001.parquet does not match its checksum (truncated or changed); logging its examples again" in err
    assert f"{out / traces.MANIFEST} is damaged or not a speccascade file" in err
    assert json.loads((out / MARKER).read_text())["complete"] and traces.read_manifest(out)["complete"]
    assert_same_rows(uninterrupted, out)


def test_evaluate_killed_at_random_points_resumes_to_the_same_results(tmp_path, capsys):
    full = evaluate(tmp_path / "full", **EVALUATE)
    killed, rng, done = tmp_path / "killed", random.Random(11), 0
    args = ["evaluate", "--out", str(killed), *_flags(EVALUATE), "--resume"]
    for attempt in range(2):  # killed once a random number of further points is complete, plus a random moment
        proc = _start(*args)
        if _wait_for_owner(killed, proc) and attempt == 0:  # a second writer while the first holds the lock
            with _paused(proc):
                code = main(["evaluate", "--out", str(killed), *_flags(EVALUATE), "--resume"])
            assert code == 2, _ended(proc, "the first writer released the lock early")
            assert f"is being written by pid {proc.pid}" in capsys.readouterr().err
        done += rng.randint(1, 3)
        while len(list(killed.glob("points/*.json"))) < done and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        assert proc.poll() is None, _ended(proc, "the run finished before it was killed; make it longer")
        proc.kill()
        proc.wait()
        sidecars = list(killed.glob("points/*.json"))
        assert all(s.with_suffix(".parquet").exists() for s in sidecars)  # a point counts only when whole
    final = _start(*args)
    output = final.communicate(timeout=300)[0]
    assert final.returncode == 0, output
    resumed = json.loads((killed / "results.json").read_text())
    expected = json.loads((tmp_path / "full" / "results.json").read_text())
    assert [_untimed(p) for p in resumed["points"]] == [_untimed(p) for p in expected["points"]]
    assert resumed["target_quality"] == full["target_quality"] and resumed["settings"] == expected["settings"]
    # every record file has its sidecar, no temporary file is left, and a rerun decodes nothing new
    parquet = sorted((killed / "points").glob("*.parquet"))
    assert len(parquet) == len(expected["points"]) and all(p.with_suffix(".json").exists() for p in parquet)
    before = (killed / "results.json").read_bytes()
    assert main(["evaluate", "--out", str(killed), *_flags(EVALUATE), "--resume"]) == 0
    assert (killed / "results.json").read_bytes() == before


def _untimed(point: dict) -> dict:
    return {k: v for k, v in point.items() if k not in TIMING}


def _training(traces: Path, out: Path, *extra: str) -> list[str]:
    return ["train-deferral", "--traces", str(traces), "--out", str(out), "--epochs", "8", "--batch-size", "32",
            "--wandb-mode", "disabled", *extra]


def _wait_for_epoch(checkpoint: Path, proc: subprocess.Popen, epoch: int, timeout: float = 300) -> int:
    """Until ``checkpoint`` holds ``epoch`` or a later one (its epoch) or the process ends (-1)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]
        except FileNotFoundError:  # not written yet, or removed by a run that finished
            saved = -1
        if saved >= epoch:
            return saved
        time.sleep(0.05)
    return -1


def test_sigint_during_training_exits_130_and_resume_finishes_the_run(tmp_path, capsys):
    traces = planted_traces(tmp_path / "traces", examples=100, rows=20)
    out = tmp_path / "head"
    args = _training(traces, out)
    proc = _start(*args)
    epoch = _wait_for_epoch(out / "checkpoints" / "last.ckpt", proc, 1)
    proc.send_signal(signal.SIGINT)
    assert epoch >= 1, _ended(proc, "no checkpoint of epoch 1 before the run ended")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert [line for line in output.splitlines() if line.startswith("error:")] == ["error: interrupted"]
    assert "Traceback" not in output and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / MARKER).is_file()  # what was written is kept
    assert main(args) == 2  # the half-written directory is refused without --resume
    assert "holds an interrupted run" in capsys.readouterr().err
    resumed = _start(*args, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert (out / "model.safetensors").exists() and not (out / "checkpoints").exists()
    assert os.listdir(out / "logs") == ["version_0"]  # one training curve, continued
    with (out / "logs" / "version_0" / "metrics.csv").open() as f:
        epochs = [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("val_loss")]
    assert epochs == list(range(8))  # every epoch validated exactly once across the two runs


@pytest.mark.parametrize("head", [(), ("--objective", "relaxed", "--alpha-range", "[0,2]")], ids=["gap", "alpha-range"])
def test_training_killed_mid_run_resumes_from_its_last_epoch_to_the_uninterrupted_weights(tmp_path, monkeypatch, head):
    """The alpha-range head draws random alphas while it trains: the checkpoint carries the random state."""
    traces = planted_traces(tmp_path / "traces", examples=100, rows=20)
    killed, full = tmp_path / "killed", tmp_path / "full"
    proc = _start(*_training(traces, killed, *head))
    epoch = _wait_for_epoch(killed / "checkpoints" / "last.ckpt", proc, 1)
    proc.kill()
    assert epoch >= 1, _ended(proc, "no checkpoint of epoch 1 before the run ended")
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed; make it longer"
    started = []
    monkeypatch.setattr(KeepBest, "on_train_start", lambda self, trainer, module: started.append(trainer.current_epoch),
                        raising=False)
    assert main(_training(traces, killed, *head, "--resume")) == 0
    assert started == [epoch + 1]  # continued after the checkpoint's epoch, not from epoch 0
    assert main(_training(traces, full, *head)) == 0
    resumed, uninterrupted = load_file(killed / "model.safetensors"), load_file(full / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.allclose(resumed[k], uninterrupted[k], atol=1e-6) for k in resumed)



@pytest.mark.parametrize("fails, existing", [("lock", False), ("marker", True)], ids=["lock-record", "marker-in-own-dir"])
def test_a_start_that_fails_on_a_full_disk_leaves_nothing_that_blocks_the_next_run(tmp_path, monkeypatch, capsys, fails,
                                                                                    existing):
    """The disk fills while the lock's owner record or the marker is written: one line, exit 2, and the next run with
    the same --out starts (no lock file or half-made directory left in its way)."""
    from speccascade import outdir

    traces_dir = planted_traces(tmp_path / "traces", examples=20, rows=5)
    out = tmp_path / "compare"
    if existing:  # a directory the user made: kept, and left empty
        out.mkdir()
    args = ["compare", "--traces", str(traces_dir), "--out", str(out), "--resamples", "10", "--wandb-mode", "disabled"]

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / (LOCK if fails == "lock" else MARKER)))

    if fails == "lock":
        monkeypatch.setattr(outdir.os, "pwrite", full)
    else:
        monkeypatch.setattr(outdir, "write_json", full)
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on device writing {out / (LOCK if fails == 'lock' else MARKER)}; free some "
                      "space and run again (--resume keeps the work that was finished)"]
    assert (os.listdir(out) == []) if existing else not out.exists()
    monkeypatch.undo()
    assert main(args) == 0 and json.loads((out / MARKER).read_text())["complete"] and not (out / LOCK).exists()


def _loading_torch(proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Until the process maps torch's library (True: its command line is loading the commands, under main's SIGINT
    handler) or ends (False). The readiness marker needs no hook in the package: Linux's /proc/PID/maps."""
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            if "libtorch" in maps.read_text():
                return True
        except OSError:
            pass
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
def test_sigint_while_the_command_starts_exits_130_with_one_line(tmp_path, delay):
    """SIGINT while torch and Lightning are still being imported: the same one line as during the run, exit 130
    (not death by SIGINT while the interpreter exits), and nothing written."""
    traces_dir = planted_traces(tmp_path / "traces", examples=20, rows=5)
    proc = _start(*_training(traces_dir, tmp_path / "head"))
    assert _loading_torch(proc), _ended(proc, "the command never loaded torch")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert [line for line in output.splitlines() if line.startswith("error:")] == ["error: interrupted"], output
    assert "Traceback" not in output and not (tmp_path / "head").exists()
