"""Outcome labels (``log-traces --labels outcome``) and the ``outcome`` objective: on a planted pair whose
answer depends on one position, the labels find it and a head trained on them defers there only; bad
input is refused; a killed run resumes to the uninterrupted rows and cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from speccascade import pairs
from speccascade.cli import main
from speccascade.data import metrics, traces
from speccascade.tracing.log_traces import log_traces
from speccascade.tracing.outcome import OutcomeLabeller
from speccascade.data.tasks import TASKS, Example, Task
from speccascade.decoding import ModelPair, continuations
from speccascade.decoding.presets import byte_tokenizer
from speccascade.deferral import rules
from speccascade.errors import SpeccascadeError
from speccascade.training import train_deferral
from tests.data.test_log_traces import assert_same_rows, drop_turn, read_rows
from tests.test_faults import _start, _wait_for
from tests.training.test_train import planted_traces

TOKENIZER = byte_tokenizer()
EOS = TOKENIZER.eos_token_id
SURE, UNSURE = 20.0, 8.0  # next-token logits: near one-hot, or a target torn between "5" (8) and "7" (7)


def _id(ch: str) -> int:
    return TOKENIZER.convert_tokens_to_ids(ch)


def bigram(chain: dict[str, dict[str, float]]) -> LlamaForCausalLM:
    """A one-layer Llama whose next-token logits depend on the current token only: one-hot embeddings, layers
    that add nothing, and ``lm_head[v, u]`` the logit of ``v`` after ``u`` ("</s>" is the end of sequence)."""
    vocab, hidden = len(TOKENIZER), 264
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        model.model.norm.weight.fill_(hidden**-0.5)  # the normalised one-hot stays one-hot
        model.lm_head.weight.zero_()
        for u, following in chain.items():
            for v, logit in following.items():
                model.lm_head.weight[EOS if v == "</s>" else _id(v), _id(u)] = logit
    return model


def planted_pair() -> ModelPair:
    """The target replies "ab=5." to a prompt ending in ":"; the drafter would write "c" first (the target then
    goes on "b=5.": harmless) and "7" after "=" (the answer becomes 7: harmful), and agrees everywhere else."""
    shared = {"a": {"b": SURE}, "c": {"b": SURE}, "b": {"=": SURE}, "5": {".": SURE}, "7": {".": SURE}, ".": {"</s>": SURE}}
    target = bigram(shared | {":": {"a": SURE}, "=": {"5": UNSURE, "7": UNSURE - 1}})
    drafter = bigram(shared | {":": {"c": SURE}, "=": {"7": SURE}})
    return ModelPair(drafter, target, TOKENIZER, "planted", "planted/drafter", "planted/target")


class Planted(Task):
    """Every example asks the same question; the answer is 5."""

    name, metric = "planted", "exact_match"

    def examples(self, split, limit=None, data_file=None, seed=0, few_shot=0):
        return [Example(f"planted-{i:03d}", "Q:", "ab=5.", "5") for i in range(limit or 40)]

    def score(self, prediction, example):
        return metrics.number_match(prediction, example.answer)


HARMFUL, HARMLESS = 3, 0  # reply positions of the two mismatches: "=" -> "7", and ":" -> "c"
OPTIONS = dict(models="tiny-random", task="planted", mode="on-policy", labels="outcome", limit=40, batch_size=8,
               shard_examples=16, max_new_tokens=16, outcome_max_new_tokens=8, topk=0, accelerator="cpu")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Traces of the planted pair (with both hidden states), logged with outcome labels."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TASKS, "planted", Planted)
        mp.setattr(pairs, "load_pair", lambda *_, **__: planted_pair())
        out = tmp_path_factory.mktemp("outcome") / "traces"
        manifest = log_traces(out, hidden_states="both", **OPTIONS)
    return out, manifest


def test_labels_find_the_one_position_the_answer_depends_on(planted):
    out, manifest = planted
    rows = read_rows(out)[1].with_format("numpy")[:]
    examined, position = rows["examined"], rows["position"]
    assert (rows["score"] == 1).all()  # the cascade decoded the target's reply, which is right
    assert (position[examined] <= 5).all() and set(position[examined]) == set(range(6))  # "ab=5." + end of sequence
    harm, delta = rows["outcome_harm"], rows["outcome_delta"]
    assert (harm[examined] == (position[examined] == HARMFUL)).all()  # 1 exactly where the swap changes the answer
    assert (delta[examined] == harm[examined]).all()
    assert (rows["draft_token"] != rows["target_argmax"])[examined & (position == HARMLESS)].all()  # a harmless mismatch
    assert np.isnan(harm[~examined]).all() and (~examined).any()  # drafts after a rejection: no label
    cost = manifest["outcome_labels"]
    assert cost["labelled_positions"] == 40 * 6 and cost["decoded_positions"] == 40 * 2 and cost["harmful_positions"] == 40
    assert cost["helpful_positions"] == 0 and cost["decoded_positions_where_target_right"] == 40 * 2  # every reply is right
    # the kept choice reuses the target's reply; the drafts continue "b=5.</s>" and ".</s>": 7 target tokens
    assert cost["extra_target_tokens"] == 40 * 7 and cost["extra_target_tokens_per_labelled_position"] == pytest.approx(7 / 6)


def test_a_swap_in_a_wrong_reply_can_help_and_is_counted_apart():
    """In the reply "ab=7." (wrong: the answer is 5) the draft "5" for "7" gains the answer, and the draft "c" for "a"
    changes nothing; only the latter is a mismatch where the target's choice scores."""
    pair, task = planted_pair(), Planted()
    prompt, reply = pair.encode(["Q:"])[0][0].tolist(), TOKENIZER("ab=7.")["input_ids"] + [EOS]
    draft = torch.tensor([_id("c"), _id("b"), _id("="), _id("5"), _id("."), EOS])
    n = len(reply)
    harm, delta, cost = OutcomeLabeller(pair, task, 8, 4).label(
        task.examples("train", limit=1), [prompt], [reply], torch.zeros(n, dtype=torch.long), torch.arange(n), draft,
        torch.tensor(reply), torch.ones(n, dtype=torch.bool))
    assert delta.tolist() == [0, 0, 0, -1, 0, 0] and harm.sum() == 0
    assert (cost.decoded, cost.harmful, cost.helpful, cost.target_right) == (2, 0, 1, 1)


def test_reusing_the_target_reply_gives_the_labels_of_decoding_both(planted):
    pair, task = planted_pair(), Planted()
    ex = task.examples("train", limit=1)
    prompt, reply = pair.encode(["Q:"])[0][0].tolist(), TOKENIZER("ab=5.")["input_ids"] + [EOS]
    draft = torch.tensor([_id("c"), _id("b"), _id("="), _id("7"), _id("."), EOS])
    choice = torch.tensor(reply)
    n = len(reply)
    args = (ex, [prompt], [reply], torch.zeros(n, dtype=torch.long), torch.arange(n), draft, choice, torch.ones(n, dtype=torch.bool))
    reused = OutcomeLabeller(pair, task, 8, 4, target_replies=True).label(*args)
    decoded = OutcomeLabeller(pair, task, 8, 4).label(*args)
    assert torch.equal(reused[0], decoded[0]) and torch.equal(reused[1], decoded[1])
    assert reused[0].tolist() == [0, 0, 0, 1, 0, 0]
    assert (reused[2].target_tokens, decoded[2].target_tokens) == (7, 14)  # decoding both: "b=5.</s>", ".</s>" twice


@pytest.mark.parametrize("head", ["mlp", "hidden-mlp", "outcome-mlp", "outcome-hidden-mlp"])
def test_a_head_trained_on_outcome_labels_defers_there_and_nowhere_else(planted, tmp_path, head):
    out, _ = planted
    trained = train_deferral([str(out)], tmp_path / head, head=head, objective="outcome", epochs=20, patience=None,
                             batch_size=16, lr=0.01, wandb_mode="disabled")
    assert trained.objective == "outcome" and trained.metrics["auroc"] == 1.0
    rows = read_rows(out)[1].with_format("torch")[:]
    labelled = rows["examined"]
    rule = rules.Learned.from_pretrained(tmp_path / head)  # the exported checkpoint, at its default threshold
    defer = rule.decide({c: rows[c][labelled] for c in rule.columns})  # token ids and position from their columns
    assert torch.equal(defer, rows["position"][labelled] == HARMFUL)


def _planted_logs(out, **options):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TASKS, "planted", Planted)
        mp.setattr(pairs, "load_pair", lambda *_, **__: planted_pair())
        log_traces(out, **(OPTIONS | options))
    return read_rows(out)[1].with_format("numpy")[:]


def test_sampled_labels_estimate_the_probability_that_the_swap_loses_the_answer(tmp_path):
    """At T = 1 the target's choice after "=" is "5" with probability p("5" | "="): the label at the harmful position
    is 1 that often (a greedy choice would make it always 1); at the harmless one the coupled continuations draw the
    same digit, so it is exactly 0 (independent draws would disagree almost half the time)."""
    rows = _planted_logs(tmp_path / "sampled", temperature=1.0, limit=300)
    examined, position, harm, delta = rows["examined"], rows["position"], rows["outcome_harm"], rows["outcome_delta"]
    at_harmful, at_harmless = examined & (position == HARMFUL), examined & (position == HARMLESS)
    assert at_harmful.sum() == at_harmless.sum() == 300  # every reply reaches both mismatches
    assert (rows["draft_token"][at_harmful] == _id("7")).all() and (rows["draft_token"][at_harmless] == _id("c")).all()
    with torch.no_grad():  # p("5" | "="), about 0.69: "7" and the rest of the vocabulary share the remainder
        expected = planted_pair().target(torch.tensor([[_id("=")]])).logits[0, -1].softmax(-1)[_id("5")].item()
    assert abs(harm[at_harmful].mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / 300)
    assert (delta[at_harmless] == 0).all()  # "a" and "c" both continue "b=", then draw the same digit
    assert (harm[examined] == (delta[examined] > 0)).all() and np.isnan(harm[~examined]).all()


def test_sampled_labels_do_not_depend_on_the_batch_or_the_continuations_decoded_together(tmp_path, monkeypatch):
    rows = []  # the rows of every batch of continuations the labeller decodes
    decode = continuations._continue
    monkeypatch.setattr(continuations, "_continue", lambda pair, seqs, cuts, *a: rows.append(len(cuts)) or decode(pair, seqs, cuts, *a))
    _planted_logs(tmp_path / "eight", temperature=1.0, limit=24, batch_size=8)
    assert max(rows) == 16  # by default twice the batch (8 replies have 16 mismatches, so 32 continuations)
    rows.clear()
    _planted_logs(tmp_path / "five", temperature=1.0, limit=24, batch_size=5, outcome_batch_size=3)
    assert max(rows) == 3 and len(rows) >= 24 * 2 * 2 / 3
    assert_same_rows(tmp_path / "eight", tmp_path / "five")


@pytest.mark.parametrize("options, message", [
    ({"task": "summarisation"}, r"checkable answer \(exact match\); task 'summarisation' is scored by rouge2"),
    ({"mode": "reference"}, "needs --mode on-policy"),
    ({"labels": "gap", "outcome_from": "elsewhere"}, "--outcome-from copies outcome labels: it needs --labels outcome"),
    ({"outcome_from": "elsewhere"}, r"--outcome-from elsewhere: no traces there \(no manifest.json\)"),
])
def test_outcome_labels_refuse_what_they_cannot_label(tmp_path, options, message):
    with pytest.raises(SpeccascadeError, match=message):
        log_traces(tmp_path / "x", **(OPTIONS | {"task": "arithmetic"} | options))
    assert not (tmp_path / "x").exists()


def test_cli_refuses_an_unchecked_task_in_one_line_and_writes_nothing(tmp_path, capsys):
    args = ["log-traces", "--out", str(tmp_path / "x"), "--models", "tiny-random", "--task", "translation",
            "--mode", "on-policy", "--labels", "outcome"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --labels outcome needs a task with a checkable answer (exact match); task 'translation' is scored by bleu"]
    assert not (tmp_path / "x").exists()


def test_outcome_objective_refuses_traces_without_the_labels(tmp_path, capsys):
    bare = planted_traces(tmp_path / "bare", examples=10, rows=5)
    with pytest.raises(SpeccascadeError, match=r"needs outcome labels, and traces .*bare have none"):
        train_deferral([str(bare)], tmp_path / "head", objective="outcome", wandb_mode="disabled")
    with pytest.raises(SpeccascadeError, match="--gap-weight .* needs objective 'outcome'"):
        train_deferral([str(bare)], tmp_path / "head", objective="gap", gap_weight=0.5, wandb_mode="disabled")
    assert not (tmp_path / "head").exists()


def test_copied_labels_are_the_labels_and_decode_no_continuation(planted, tmp_path, monkeypatch):
    """Labels logged without hidden states, then logged again with both hidden states and ``--outcome-from``: the
    rows of a run that labelled and logged the hidden states at once, and the labels' cost, with no continuation."""
    labelled, manifest = planted
    bare, copied = tmp_path / "bare", tmp_path / "copied"
    _planted_logs(bare, hidden_states="none")
    drop_turn(bare)  # and logged before traces had `turn`: their rows are turn 0
    monkeypatch.setattr(OutcomeLabeller, "label", lambda *_, **__: pytest.fail("a continuation was decoded"))
    _planted_logs(copied, hidden_states="both", outcome_from=str(bare))
    assert_same_rows(labelled, copied)  # hidden states and labels alike
    cost = traces.read_manifest(copied)["outcome_labels"]
    assert cost.pop("copied_from") == {"traces": str(bare), "fingerprint": traces.read_manifest(bare)["fingerprint"]}
    assert cost == manifest["outcome_labels"]


def test_copied_labels_refuse_other_settings_or_other_replies(tmp_path):
    source = tmp_path / "source"
    _planted_logs(source, limit=8)
    with pytest.raises(SpeccascadeError, match=r"logged with max_new_tokens=16, this run has 12; labels carry over only"):
        _planted_logs(tmp_path / "longer", limit=8, max_new_tokens=12, outcome_from=str(source))
    assert not (tmp_path / "longer").exists()
    pair = planted_pair()  # the same settings, but a drafter that drafts the target's tokens: other rows
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TASKS, "planted", Planted)
        mp.setattr(pairs, "load_pair", lambda *_, **__: ModelPair(pair.target, pair.target, TOKENIZER, "planted", "d", "t"))
        message = (r"example 'planted-000' turn 0 position 0 has drafted \d+ against the target's \d+ there, this run "
                   r"drafted (\d+) against \1; not the same replies")
        with pytest.raises(SpeccascadeError, match=message):
            log_traces(tmp_path / "other", **(OPTIONS | {"limit": 8, "outcome_from": str(source)}))
    assert not (tmp_path / "other").exists()  # refused in its first batch: nothing written


def _cli(out, extra=()):
    return ["log-traces", "--out", str(out), "--models", "tiny-random", "--task", "arithmetic", "--limit", "6",
            "--mode", "on-policy", "--labels", "outcome", "--max-new-tokens", "16", "--outcome-max-new-tokens", "8",
            "--rule", "opt:0.1", "--batch-size", "2", "--shard-examples", "2", "--topk", "0", "--accelerator", "cpu", *extra]


def test_killed_outcome_logging_resumes_to_the_uninterrupted_rows_and_cost(tmp_path, capsys):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(_cli(full)) == 0
    cost, rows = traces.read_manifest(full)["outcome_labels"], read_rows(full)[1].with_format("numpy")[:]
    numbers, labels, where = capsys.readouterr().out.splitlines()[-3:]
    accepted, examined, deferred = rows["accepted"], rows["examined"], rows["deferred"]
    assert numbers.endswith(f"on-policy mode under opt:0.1; {accepted.mean():.0%} of drafted positions accepted, "
                            f"{deferred[examined].mean():.0%} of the {examined.sum()} examined ones deferred")
    assert labels.startswith(f"log-traces: outcome labels on {cost['labelled_positions']} examined positions, "
                             f"{cost['decoded_positions']} decoded") and f"{cost['extra_target_tokens']} extra" in labels
    assert where == f"log-traces: wrote {full} (manifest.json, shards/)"
    proc = _start(*_cli(killed))
    _wait_for(killed / "shards" / "r000-00000.json", proc)  # killed after its first shard
    proc.kill()
    proc.wait()
    assert not traces.read_manifest(killed)["complete"], "the run finished before it was killed; make it longer"
    first = (killed / "shards" / "r000-00000.json").read_text()
    assert main(_cli(killed, ["--resume"])) == 0
    assert (killed / "shards" / "r000-00000.json").read_text() == first  # the complete shard was kept, not redone
    a, b = traces.read_manifest(full), traces.read_manifest(killed)
    assert a["rows"] == b["rows"] and a["outcome_labels"] == b["outcome_labels"]  # nothing lost, nothing repeated
    assert b["outcome_labels"]["decoded_positions"] > 0
    assert_same_rows(full, killed)


def test_gap_weight_mixes_the_target_gap_into_the_outcome_label():
    from torch.nn.functional import binary_cross_entropy_with_logits as bce

    from speccascade.training.module import objective_loss

    score, y = torch.tensor([0.5, -1.0, 2.0]), {"outcome_harm": torch.tensor([1.0, 0.0, 0.0]), "p_gap": torch.tensor([0.2, 0.9, 0.0])}
    for w in (0.0, 0.3, 1.0):
        expected = bce(score, (1 - w) * y["outcome_harm"] + w * y["p_gap"])
        assert float(objective_loss("outcome", score, y, 0.0, gap_weight=w)) == pytest.approx(float(expected))
