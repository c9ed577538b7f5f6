"""``speccascade bench``, ``evaluate`` and ``log-traces`` with ``--task spec-bench`` on tiny-random, with a small copy
of Spec-Bench's file (a few categories, two-turn prompts, missing references); their refusals."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from speccascade.bench.command import turn_prompts
from speccascade.cli import main
from speccascade.data import get_task, traces
from speccascade.decoding import ModelPair
from speccascade.deferral import features as F
from speccascade.deferral import rules
from speccascade.deferral.heads import DeferralHead
from speccascade.evaluation.evaluate import evaluate
from speccascade.pairs import load_pair
from speccascade.tracing import log_traces as log_traces_module
from speccascade.tracing.log_traces import log_traces
from tests.data.test_spec_bench import RECORDS, write_jsonl
from tests.helpers import wandb_records

BENCH_ROWS = ["assisted generation", "target alone", "cascade opt:0.3", "exact speculative decoding"]


@pytest.fixture
def small(tmp_path):
    return write_jsonl(tmp_path / "question.jsonl", RECORDS)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bench_writes_spec_benchs_table_by_category(tmp_path, small):
    out = tmp_path / "bench"
    assert main(["bench", "--models", "tiny-random", "--task", "spec-bench", "--data-file", str(small), "--out", str(out),
                 "--categories", "mt_bench,translation,rag", "--limit-per-category", "1", "--max-new-tokens", "4",
                 "--repeats", "1", "--rules", "opt:0.3"]) == 0
    saved = json.loads((out / "bench.json").read_text())
    table = saved["spec_bench"]
    assert table["columns"] == ["mt_bench", "translation", "rag", "overall"]
    assert table["prompts"] == {"mt_bench": 1, "translation": 1, "rag": 1, "overall": 3}
    assert table["turns"] == {"mt_bench": 2, "translation": 1, "rag": 1, "overall": 4}  # the two-turn prompt, turn by turn
    assert [r["name"] for r in table["rows"]] == BENCH_ROWS and {r["batch_size"] for r in saved["results"]} == {1}
    assert all(len(r["batch_tokens"]) == 4 for r in saved["results"])  # every configuration decoded every turn
    rows = {r["name"]: r for r in table["rows"]}
    assert all(v == {"estimate": 1.0, "low": 1.0, "high": 1.0} for v in rows["target alone"]["speedup"].values())
    assert rows["assisted generation"]["tokens_per_target_call"] is None
    assert 1 <= rows["exact speculative decoding"]["tokens_per_target_call"] <= 6
    for r in table["rows"] + table["ratios"]:
        assert all(v["low"] <= v["estimate"] <= v["high"] for v in r["speedup"].values())
    assert [r["name"] for r in table["ratios"]] == ["exact speculative decoding / assisted generation",
                                                    "cascade opt:0.3 / exact speculative decoding"]
    assert set(table["goal"]["met_by_category"]) == {"mt_bench", "translation", "rag"}
    records = {(r["example_id"], r["configuration"]): r for r in table["records"]}  # a record per prompt and row
    assert len(records) == 3 * 4 and records[("writing-81", "target alone")]["turns"] == 2
    assert {r["category"] for r in table["records"]} == {"mt_bench", "translation", "rag"}
    assert sum(r["new_tokens"] for r in table["records"] if r["configuration"] == "target alone") == sum(
        next(r for r in saved["results"] if r["name"] == "target alone")["batch_tokens"])
    assert (saved["categories"], saved["limit_per_category"], saved["prompts"], saved["turns"]) == (
        "mt_bench,translation,rag", 1, 3, 4)
    text = (out / "bench.md").read_text()
    assert "| configuration | mt_bench | translation | rag | tokens/target call | overall |" in text
    assert "Goal: exact speculative decoding / transformers assisted generation" in text


def test_bench_with_adaptive_blocks_sets_them_against_transformers_adaptive_drafts(tmp_path, small):
    """With --draft-stop, Spec-Bench's table holds transformers' adaptive assisted generation (its defaults) and the
    paired ratio of speccascade's adaptive exact decoding to it, after the goal's fixed-block ratio."""
    out = tmp_path / "bench"
    assert main(["bench", "--models", "tiny-random", "--task", "spec-bench", "--data-file", str(small), "--out", str(out),
                 "--categories", "translation,rag", "--limit-per-category", "1", "--max-new-tokens", "4",
                 "--repeats", "1", "--rules", "opt:0.3", "--draft-stop", "0.2"]) == 0
    table = json.loads((out / "bench.json").read_text())["spec_bench"]
    assert "assisted generation, adaptive drafts" in [r["name"] for r in table["rows"]]
    assert [r["name"] for r in table["ratios"]] == [
        "exact speculative decoding / assisted generation",
        "exact speculative decoding, drafts stop below 0.2 / assisted generation, adaptive drafts",
        "cascade opt:0.3, drafts stop below 0.2 / exact speculative decoding, drafts stop below 0.2"]
    assert set(table["ratios"][1]["speedup"]) == {"translation", "rag", "overall"}
    assert set(table["goal"]["met_by_category"]) == {"translation", "rag"}  # the goal stays the fixed-block ratio


def test_a_later_turn_is_decoded_after_the_targets_reply(small):
    pair = load_pair("tiny-random")
    examples = get_task("spec-bench").examples("test", data_file=small)[:3]
    prompts, owners = turn_prompts(pair, examples, 3)
    assert owners == [0, 0, 1, 2]
    first, second = prompts[:2]
    assert first == [{"role": "user", "content": examples[0].prompt}]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0] == first[0] and second[2]["content"] == examples[0].followups[0]


@pytest.mark.parametrize("extra, message", [
    (["--batch-sizes", "1,2"], "spec-bench runs at batch 1"),
    (["--categories", "chat"], "unknown category 'chat'"),
    (["--limit-per-category", "0"], "--limit-per-category must be >= 1"),
])
def test_bench_refuses_bad_spec_bench_settings_before_any_work(tmp_path, small, capsys, extra, message):
    out = tmp_path / "b"
    argv = ["bench", "--models", "tiny-random", "--task", "spec-bench", "--data-file", str(small), "--out", str(out)]
    assert main([*argv, *extra]) == 2
    assert message in one_error_line(capsys) and not out.exists()


@pytest.mark.parametrize("command", ["bench", "evaluate"])
def test_a_missing_or_garbled_file_or_a_task_without_categories_is_refused(tmp_path, capsys, command):
    out, garbled = tmp_path / "o", tmp_path / "garbled.jsonl"
    garbled.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n{"question_id":\n')
    no_rag = write_jsonl(tmp_path / "no-rag.jsonl", [r for r in RECORDS if r["category"] != "rag"])
    base = [command, "--models", "tiny-random", "--out", str(out)] + (["--wandb-mode", "disabled"] * (command == "evaluate"))
    cases = [(["--task", "spec-bench"], "pass --data-file"),
             (["--task", "spec-bench", "--data-file", str(tmp_path / "none.jsonl")], "not found"),
             (["--task", "spec-bench", "--data-file", str(garbled)], f"{garbled}:2: invalid JSON"),
             (["--task", "spec-bench", "--data-file", str(no_rag), "--categories", "rag"], "no examples in category 'rag'"),
             (["--categories", "qa"], "need a task with categories")]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in one_error_line(capsys) and not out.exists()


def test_evaluate_reports_quality_per_category_paired_with_the_target(tmp_path, small, monkeypatch):
    seen = []
    encode = ModelPair.encode
    monkeypatch.setattr(ModelPair, "encode", lambda self, prompts, chat=True: (seen.extend(prompts), encode(self, prompts, chat))[1])
    out = tmp_path / "eval"
    result = evaluate(out, models="tiny-random", task="spec-bench", data_file=str(small), rules="always,opt:0.3",
                      max_new_tokens=4, batch_size=3, wandb_mode="offline")
    examples = get_task("spec-bench").examples("test", data_file=small)
    points = {p["label"]: p for p in result["points"]}
    for p in result["points"]:
        records = pq.read_table(out / p["records"]).to_pydict()
        assert records["category"] == [e.category for e in examples]
        assert set(p["categories"]) == set(records["category"])
        for category, c in p["categories"].items():
            scored = category in ("translation", "summarization", "math_reasoning", "rag")
            assert math.isnan(c["quality"]) != scored
            assert not scored or c["quality_low"] <= c["quality"] <= c["quality_high"]
    exact = points["speculative decoding"]["categories"]  # greedy exact decoding is the target, category by category
    assert all(exact[c]["difference"] == 0.0 for c in ("translation", "rag"))
    assert result["settings"]["category_metrics"]["rag"] == "contains_answer"
    # the two-turn prompt's second turn went in with the first reply, which is in its record
    writing = next(e for e in examples if e.id == "writing-81")
    later = [p for p in seen if not isinstance(p, str) and len(p) == 3 and p[0]["content"] == writing.prompt]
    assert later and all(p[2]["content"] == writing.followups[0] for p in later)
    target = pq.read_table(out / points["target only"]["records"]).to_pydict()
    assert target["text"][target["example_id"].index("writing-81")].startswith(later[0][1]["content"])
    assert "| speculative decoding | rag | contains_answer | 1 |" in (out / "report.md").read_text()
    (run,) = (out / "wandb").glob("offline-run-*")
    logged = {item.nested_key[0] for r in wandb_records(run) if r.WhichOneof("record_type") == "history"
              for item in r.history.item}
    assert {"points", "categories"} <= logged
    (file,) = run.glob("files/media/table/categories_*.table.json")
    table = json.loads(file.read_text())  # keyed by rule, knob and category: one row per point and category
    assert table["columns"][:2] == ["rule", "knob"] and "category" in table["columns"]
    assert len(table["data"]) == 3 * 6


def trace_rows(directory) -> dict[str, list]:
    manifest = traces.read_manifest(directory)
    return pa.concat_tables(pq.read_table(directory / s["file"]) for s in manifest["shards"]).to_pydict()


def by_example(rows: dict[str, list]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for i, example_id in enumerate(rows["example_id"]):
        grouped.setdefault(example_id, []).append({k: v[i] for k, v in rows.items()})
    return grouped


def test_log_traces_on_policy_logs_both_turns_the_second_after_the_first_reply(tmp_path, small, monkeypatch):
    seen = []
    encode = ModelPair.encode
    monkeypatch.setattr(ModelPair, "encode", lambda self, prompts, chat=True: (seen.extend(prompts), encode(self, prompts, chat))[1])
    out = tmp_path / "traces"
    manifest = log_traces(out, models="tiny-random", task="spec-bench", data_file=str(small), split="test", limit=None,
                          mode="on-policy", max_new_tokens=4, batch_size=3, shard_examples=4, topk=0, wandb_mode="disabled")
    examples = {e.id: e for e in get_task("spec-bench").examples("test", data_file=small)}
    grouped = by_example(trace_rows(out))
    assert manifest["examples"] == 8 and grouped.keys() == examples.keys()
    pair = load_pair("tiny-random")
    for example_id, rows in grouped.items():
        example = examples[example_id]
        assert {r["category"] for r in rows} == {example.category}
        assert {r["turn"] for r in rows} == set(range(1 + len(example.followups)))
        examined = sorted((r for r in rows if r["examined"]), key=lambda r: (r["turn"], r["position"]))
        assert len({(r["turn"], r["position"]) for r in examined}) == len(examined)  # (example, turn, position) unique
        assert len({(r["turn"], r["position"] - r["position_in_block"], r["position_in_block"]) for r in rows}) == len(rows)
        for turn in range(1 + len(example.followups)):  # each reply token examined once, from 0 in each turn (gamma > 4)
            positions = [r["position"] for r in examined if r["turn"] == turn]
            assert positions == list(range(len(positions))) and 0 < len(positions) <= 4
        scored = example.category in ("translation", "summarization", "math_reasoning", "rag") and example.answer
        assert all(math.isnan(r["score"]) != bool(scored) for r in rows)
        if not example.followups:
            continue
        first = [r["draft_token"] if r["accepted"] else r["target_argmax"] for r in examined if r["turn"] == 0]  # greedy: p's argmax
        (second,) = [p for p in seen if not isinstance(p, str) and len(p) == 3 and p[0]["content"] == example.prompt]
        assert second[1] == {"role": "assistant", "content": pair.decode([first])[0]}
        assert second[2] == {"role": "user", "content": example.followups[0]}


def test_a_later_turns_reply_position_on_traces_is_the_one_the_decoder_gives_the_head(tmp_path, small, monkeypatch):
    """A head on reply_position reads, at a second turn's trace row, what the decoder gave it at that draft: the
    decoder starts each turn's reply at 0, and so do the trace's positions."""
    features = [*F.POSITION_FEATURES, "reply_position"]
    DeferralHead(features, mean=[0.0] * len(features), std=[1.0] * len(features)).save(tmp_path / "head")
    live, drafts = [], []  # per block the decoder decided: what live_context gave the head, and the block's drafts
    mix, context = rules.Learned.mix, rules.live_context
    monkeypatch.setattr(rules, "live_context", lambda *args, **kw: (live.append(context(*args, **kw)), live[-1])[1])
    monkeypatch.setattr(rules.Learned, "mix", lambda self, *args, **kw: (drafts.append(args[6]), mix(self, *args, **kw))[1])
    out = tmp_path / "traces"
    log_traces(out, models="tiny-random", task="spec-bench", data_file=str(small), split="test", categories="mt_bench",
               limit_per_category=1, mode="on-policy", rule=f"learned:{tmp_path / 'head'}", block_size=3,
               max_new_tokens=8, batch_size=1, topk=0, wandb_mode="disabled")
    rows = trace_rows(out)
    assert set(rows["example_id"]) == {"writing-81"} and set(rows["turn"]) == {0, 1}  # batch 1: one example a decode
    starts = list(dict.fromkeys(zip(rows["turn"], (p - b for p, b in zip(rows["position"], rows["position_in_block"])))))
    assert len(starts) == len(live) == len(drafts) and sum(turn == 1 for turn, _ in starts) > 1  # a row per block
    checked = 0
    for turn, position, in_block, draft in zip(rows["turn"], rows["position"], rows["position_in_block"], rows["draft_token"]):
        if turn != 1:
            continue
        block = starts.index((turn, position - in_block))
        assert drafts[block][0, in_block] == draft  # the decoder's draft this row logs
        from_traces = F.trace_context({"position": torch.tensor([position])}, ["reply_position"])["reply_position"]
        assert torch.equal(from_traces, live[block]["reply_position"][0, in_block].reshape(1)), (position, in_block)
        checked += 1
    assert checked > 3


def test_log_traces_reference_mode_takes_the_categories_with_references(tmp_path, small):
    out = tmp_path / "traces"
    log_traces(out, models="tiny-random", task="spec-bench", data_file=str(small), split="test", limit=None,
               categories="summarization,math_reasoning,rag", max_reference_tokens=3, topk=0, wandb_mode="disabled")
    grouped = by_example(trace_rows(out))
    examples = {e.id: e for e in get_task("spec-bench").examples("test", data_file=small)}
    assert sorted(grouped) == ["math_reasoning-401", "rag-481", "summarization-241"]
    tokenizer = load_pair("tiny-random").tokenizer
    for example_id, rows in grouped.items():
        gold = tokenizer(examples[example_id].reference, add_special_tokens=False)["input_ids"]
        assert len(rows) == min(len(gold), 3) + 1  # the cut gold reply and EOS
        assert {r["category"] for r in rows} == {examples[example_id].category}


@pytest.mark.parametrize("extra, message", [
    (["--split", "test", "--mode", "reference"],
     "4 of the 8 spec-bench examples have none or more than one turn (e.g. 'writing-81'; categories mt_bench, qa, "
     "translation): pick others (--categories) or use --mode on-policy"),
    (["--split", "test", "--categories", "translation"], "1 of the 2 spec-bench examples have none or more than one turn (e.g. 'translation-162'; categories translation)"),
    ([], "spec-bench has one split, 'test', not 'train'"),
])
def test_log_traces_refuses_what_it_cannot_log_before_any_model_loads(tmp_path, small, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(log_traces_module, "load_settings_pair", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "t"
    assert main(["log-traces", "--models", "tiny-random", "--task", "spec-bench", "--data-file", str(small),
                 "--out", str(out), "--wandb-mode", "disabled", *extra]) == 2
    assert message in one_error_line(capsys) and not out.exists()
