"""``speccascade finetune`` on tiny-random: the loss falls and a planted reply is learned, the exported
directory loads with ``load_pair`` and decodes the same after a reload, a killed run resumes from its last
checkpoint, and bad input is one line with exit 2."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from speccascade import Autoregressive, SpeculativeCascade, __version__, load_pair, rules
from speccascade.cli import main
from speccascade.data.tasks import get_task
from speccascade.decoding.presets import byte_tokenizer, tiny_llama
from speccascade.finetune import finetune
from speccascade.finetune.data import IGNORE, Encoded, pack
from speccascade.finetune.models import export, lora_wrap
from speccascade.outdir import locked
from tests.helpers import wandb_records

PLANTED = "ok 42"  # every reply of the planted task


def metrics(out: Path, version: int = 0) -> list[dict]:
    with (out / "logs" / f"version_{version}" / "metrics.csv").open() as f:
        return [row for row in csv.DictReader(f) if row.get("train_loss")]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A translation-style task whose every reply is PLANTED, whatever the source text."""
    path = tmp_path_factory.mktemp("data") / "planted.jsonl"
    with path.open("w") as f:
        for i in range(64):
            f.write(json.dumps({"source": f"sentence number {i * 7919 % 1000}", "target": PLANTED}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, planted) -> dict[str, Path]:
    """A fine-tuned target (all layers) and a one-layer drafter distilled towards it, both on the planted task."""
    root = tmp_path_factory.mktemp("finetune")
    common = dict(task="translation", data_file=str(planted), batch_size=8, lr=1e-2, warmup_steps=2, eval_split="train",
                  eval_examples=8, max_new_tokens=8, wandb_mode="disabled")
    finetune(root / "target", base="tiny-random", steps=30, **common)
    finetune(root / "drafter", base=str(root / "target"), layers=[0], teacher=str(root / "target"), distill_weight=0.5,
             steps=15, seed=1, **common)
    return {"target": root / "target", "drafter": root / "drafter"}


def test_packing_keeps_examples_apart_and_labels_only_replies():
    examples = [Encoded((5, 6, 7), (8, 9)), Encoded((10,), (11, 12, 13)), Encoded((14, 15), (16,))]
    batch = pack(examples, pack_length=9, pad_id=0)
    assert batch["input_ids"].shape[0] == 2  # 5 + 4 and 3 tokens: two rows of 9
    assert int((batch["labels"] != IGNORE).sum()) == 6  # reply tokens only, each once
    starts = (batch["position_ids"] == 0) & (batch["input_ids"] != 0)
    assert int(starts.sum()) == 3  # every example restarts its positions


def test_loss_falls_and_the_planted_reply_is_learned(trained):
    for name in ("target", "drafter"):
        rows = metrics(trained[name])
        first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
        assert last < 0.2 * first, (name, first, last)
    target = json.loads((trained["target"] / "finetune.json").read_text())
    assert target["heldout"]["quality"]["estimate"] >= 0.75  # learned, with a margin for other machines' kernels
    assert target["data_seen"]["examples"] == 30 * 8 and target["mode"] == "full"
    drafter = json.loads((trained["drafter"] / "finetune.json").read_text())
    held = drafter["heldout"]
    assert held["teacher_quality"]["estimate"] >= 0.75 and held["greedy_agreement"]["estimate"] > 0.9
    assert held["greedy_agreement"]["low"] <= held["greedy_agreement"]["estimate"] <= held["greedy_agreement"]["high"]


def test_exported_pair_loads_with_load_pair_and_decodes_the_same_after_a_reload(trained, planted):
    config = json.loads((trained["drafter"] / "config.json").read_text())
    assert config["num_hidden_layers"] == 1  # a standalone layer-subset drafter
    prompts = [ex.prompt for ex in get_task("translation").examples("train", limit=3, data_file=str(planted))]
    outputs = []
    for _ in range(2):
        pair = load_pair(drafter=str(trained["drafter"]), target=str(trained["target"]), device="cpu")
        ids, mask = pair.encode(prompts)
        target = Autoregressive(pair, "target").generate(ids, mask, max_new_tokens=8)
        spec = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3).generate(ids, mask, max_new_tokens=8)
        assert torch.equal(spec.sequences, target.sequences)  # exact speculative decoding on the new pair
        assert [t.strip() for t in pair.decode(target.new_tokens)] == [PLANTED] * 3
        outputs.append(target.sequences)
    assert torch.equal(outputs[0], outputs[1])


def test_lora_is_merged_on_export(tmp_path, planted):
    finetune(tmp_path / "lora", base="tiny-random", task="translation", data_file=str(planted), steps=30, batch_size=8,
             lr=3e-2, warmup_steps=2, lora_rank=8, eval_split="train", eval_examples=8, max_new_tokens=8,
             wandb_mode="disabled")
    saved = json.loads((tmp_path / "lora" / "finetune.json").read_text())
    # learned (the untuned model never replies PLANTED), with a margin: the exact count depends on the CPU's kernels
    assert saved["mode"] == "lora" and saved["heldout"]["quality"]["estimate"] >= 0.75
    assert not any(p.name.startswith("adapter") for p in (tmp_path / "lora").iterdir())  # plain weights, no adapter files


def test_the_exported_merged_model_computes_what_the_adapter_model_computed(tmp_path):
    """Merging LoRA on export changes no greedy token and no logit beyond float rounding (adapters made non-zero)."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(2, len(tokenizer), seed=0).eval()
    ids = torch.randint(3, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    adapted = lora_wrap(model, rank=4, alpha=8.0, dropout=0.0, targets=None).eval()
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)  # peft starts B at zero: make the adapters change the output
        before = adapted(ids).logits
        greedy = adapted.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert (before - base).abs().max() > 0.1  # the adapters matter, so a merge that dropped them would fail below
    export(adapted, tokenizer, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, before, atol=1e-4, rtol=1e-4)
        assert torch.equal(merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), greedy)


def test_a_finished_run_is_not_redone_and_says_its_quality_and_directory(trained, planted, capsys):
    args = ["finetune", "--out", str(trained["target"]), "--base", "tiny-random", "--steps", "30", "--task", "translation",
            "--data-file", str(planted), "--batch-size", "8", "--lr", "0.01", "--warmup-steps", "2", "--eval-split", "train",
            "--eval-examples", "8", "--max-new-tokens", "8", "--wandb-mode", "disabled"]
    before = (trained["target"] / "finetune.json").read_text()
    assert main(args) == 0 and (trained["target"] / "finetune.json").read_text() == before
    held = json.loads(before)["heldout"]
    q = held["quality"]
    assert capsys.readouterr().out.splitlines()[-3:] == [
        f"finetune: {trained['target']} already holds this fine-tune; nothing to do",
        f"finetune: fine-tuned tiny-random on translation (full, 30 steps); held-out {held['metric']} on train (8 examples, "
        f"greedy): {q['estimate']:.3f} [95% CI {q['low']:.3f}, {q['high']:.3f}]",
        f"finetune: wrote {trained['target']} (a Hugging Face model directory; finetune.json, heldout.json)"]


def test_a_finished_run_is_not_redone_and_other_settings_are_refused(trained, capsys):
    assert main(["finetune", "--out", str(trained["target"]), "--base", "tiny-random", "--steps", "31"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "speccascade.cli", "finetune", "--base", "tiny-random", "--out", str(out), "--steps", "40",
            "--batch-size", "4", "--checkpoint-every", "4", "--eval-examples", "0", "--wandb-mode", "disabled"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # at once: Lightning writes a checkpoint atomically, and the run must not finish first
    proc.wait()
    resumed_from = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < resumed_from < 40 and not (out / "finetune.json").exists()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    second = metrics(out, version=1)
    assert int(float(second[0]["step"])) == resumed_from  # the rerun's first step is the checkpoint's next one
    assert [int(float(r["data_step"])) for r in second] == list(range(resumed_from, 40))  # the same batches, none twice
    assert json.loads((out / "finetune.json").read_text())["steps"] == 40
    assert not (out / "checkpoints").exists()  # removed once the model is exported


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task"),
    (["--layers", "0-x"], "layers must look like"),
    (["--layers", "[0, 7]"], "layers must be distinct indices in [0, 2)"),
    (["--steps", "-1"], "steps must be >= 1"),
    (["--distill-weight", "0.5"], "needs a teacher"),
    (["--precision", "fp8"], "precision must be one of"),
    (["--base", "/nonexistent/model"], "cannot load model"),
    (["--pack-length", "16"], "raise pack_length"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main(["finetune", "--base", "tiny-random", "--out", str(tmp_path / "out"), "--steps", "2",
                 "--eval-examples", "0", "--wandb-mode", "disabled", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("name", ["finetune.json", "finetune-settings.json"])
def test_a_damaged_record_of_the_fine_tune_is_bad_input(tmp_path, capsys, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text('{"recipe": {"base": "tiny-ran')
    code = main(["finetune", "--base", "tiny-random", "--out", str(out), "--steps", "2", "--eval-examples", "0",
                 "--wandb-mode", "disabled"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {out / name} is damaged or not a speccascade file") and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == [name]  # left as it was


def test_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["finetune", "--base", "tiny-random", "--out", str(tmp_path / "file"), "--wandb-mode", "disabled"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_second_writer_is_refused_while_the_first_holds_the_directory(tmp_path, capsys):
    out = tmp_path / "busy"
    with locked(out, "finetune"):  # as a running fine-tune holds it
        code = main(["finetune", "--base", "tiny-random", "--out", str(out), "--steps", "2", "--eval-examples", "0",
                     "--wandb-mode", "disabled"])
        err = capsys.readouterr().err
        assert code == 2 and "is being written by pid" in err and not (out / "finetune.json").exists()
    assert not out.exists()  # the lock's owner created the directory and left it empty: removed


def test_each_fine_tune_is_its_own_offline_wandb_run(tmp_path, planted):
    for name in ("a", "b"):
        finetune(tmp_path / name, base="tiny-random", task="translation", data_file=str(planted), steps=2, batch_size=4,
                 eval_split="train", eval_examples=4, max_new_tokens=4, wandb_mode="offline")
    runs = [next((tmp_path / name / "wandb").glob("offline-run-*")).name for name in ("a", "b")]
    assert runs[0] != runs[1]  # the second run is not appended to the first
    run = next(r.run for r in wandb_records(next((tmp_path / "a" / "wandb").glob("offline-run-*")))
               if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["speccascade_version"] == __version__ and config["steps"] == 2 and run.job_type == "finetune"
