"""Outcome heads on token ids and the reply position (issue 24): on a planted task where one kind of mismatch is
harmless although the target is confident, a learned head beats Gain and FLy, and only because it reads its inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speccascade import SpeculativeCascade, rules
from speccascade.cli import main
from speccascade.data import traces
from speccascade.deferral import features as F
from speccascade.deferral.heads import DeferralHead
from speccascade.deferral.spec import CONTEXT_INPUTS, Source, check_head
from speccascade.errors import SpeccascadeError
from speccascade.training import train_deferral

VOCAB, GAMMA, BLOCKS = 24, 4, 6  # 6 blocks of 4 drafts: reply positions 0..23
WORDING, ANSWER = np.arange(4, 12), np.arange(12, 20)  # token classes: a wording swap never changes the answer
LATE = 8  # an answer-token swap loses the answer from this reply position on (earlier: an intermediate restated)


def _peaked(rng: np.random.Generator, top: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """``[N, V]`` distributions with ``mass`` on token ``top`` and the rest spread at random over the others."""
    rest = rng.random((len(top), VOCAB)) ** 3
    rest[np.arange(len(top)), top] = 0
    rest *= ((1 - mass) / rest.sum(1))[:, None]
    rest[np.arange(len(top)), top] = mass
    return rest


def planted_blocks(examples: int, seed: int) -> dict[str, torch.Tensor]:
    """Blocks of a reply: the target is confident (top-1 0.85-0.97) at every position, the drafter drafts its own
    confident token, and half the drafts are mismatches of the target's token's class. A mismatch is harmful iff
    it swaps answer tokens at reply position >= LATE: the distributions of both kinds are drawn alike, so no
    function of ``q`` and ``p`` alone tells them apart."""
    rng = np.random.default_rng(seed)
    n = examples * BLOCKS * (GAMMA + 1)  # the bonus position is drawn too (FLy reads p there)
    answer = rng.random(n) < 0.5
    target = np.where(answer, rng.choice(ANSWER, n), rng.choice(WORDING, n))
    other = np.where(answer, rng.choice(ANSWER, n), rng.choice(WORDING, n))
    draft = np.where((rng.random(n) < 0.5) & (other != target), other, target)
    p = _peaked(rng, target, rng.uniform(0.85, 0.97, n))
    q = _peaked(rng, draft, rng.uniform(0.5, 0.9, n))
    shape = (examples * BLOCKS, GAMMA + 1)
    position = (np.arange(examples * BLOCKS) % BLOCKS)[:, None] * GAMMA + np.arange(GAMMA + 1)
    harm = (draft != target) & answer & (position.reshape(-1) >= LATE)
    return {"q": torch.tensor(q, dtype=torch.float32).view(*shape, VOCAB), "p": torch.tensor(p, dtype=torch.float32).view(*shape, VOCAB),
            "draft": torch.tensor(draft).view(shape), "target": torch.tensor(target).view(shape),
            "position": torch.tensor(position), "harm": torch.tensor(harm, dtype=torch.float32).view(shape)}


def rows_of(blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The blocks' drafted positions as on-policy trace columns (every draft examined)."""
    q, p = blocks["q"][:, :GAMMA].reshape(-1, VOCAB), blocks["p"][:, :GAMMA].reshape(-1, VOCAB)
    draft = blocks["draft"][:, :GAMMA].reshape(-1)
    in_block = torch.arange(GAMMA).repeat(len(blocks["q"]))
    cols = F.position_features(q, p, (in_block + 1) / GAMMA) | F.token_features(q, p, draft)
    example = (torch.arange(len(blocks["q"])) // BLOCKS).repeat_interleave(GAMMA)
    return cols | {"draft_token": draft, "target_argmax": p.argmax(-1), "position": blocks["position"][:, :GAMMA].reshape(-1),
                   "position_in_block": in_block, "example_index": example, "outcome_harm": blocks["harm"][:, :GAMMA].reshape(-1),
                   "p_gap": cols["p_top1"] - cols["p_tok"]}


def write_planted(directory: Path, examples: int, seed: int) -> Path:
    cols = {name: value.numpy() for name, value in rows_of(planted_blocks(examples, seed)).items()}
    names = [f"ex-{i:04d}" for i in range(examples)]
    writer = traces.ShardWriter(directory, rank=0)
    writer.write({"example_id": np.repeat(names, BLOCKS * GAMMA).astype(object)} | cols, names)
    traces.write_manifest(directory, {"config": {}, "feature_spec": F.spec(), "tokenizer": "vocab-24", "vocab_size": VOCAB,
                                      "outcome_labels": {}}, complete=True)
    return directory


def harmless_deferred(score: np.ndarray, harm: np.ndarray, kept_harm: float = 0.05) -> float:
    """Of the harmless mismatches, the share deferred by a score's threshold that keeps at most ``kept_harm`` of
    the harmful ones (defer iff score >= threshold)."""
    threshold = np.quantile(score[harm], kept_harm)
    return float((score[~harm] >= threshold).mean())


def fly_harmless_deferred(blocks: dict[str, torch.Tensor], kept_harm: float = 0.05) -> float:
    """FLy's best over its knob: the fewest harmless mismatches deferred at any theta that keeps at most
    ``kept_harm`` of the harmful ones."""
    mismatch = (blocks["draft"] != blocks["target"])[:, :GAMMA]
    harm = blocks["harm"][:, :GAMMA] > 0
    best = 1.0
    for theta in np.linspace(0.0, 1.2, 49):
        defer = rules.FLy(theta=float(theta)).defer(blocks["p"], blocks["draft"][:, :GAMMA])[:, :GAMMA]
        if (~defer[mismatch & harm]).float().mean() <= kept_harm:
            best = min(best, float(defer[mismatch & ~harm].float().mean()))
    return best


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("outcome")
    return write_planted(root / "train", examples=240, seed=0), planted_blocks(examples=120, seed=1)


def _train(traces_dir: Path, out: Path, **options):
    return train_deferral([str(traces_dir)], out, objective="outcome", epochs=25, patience=None, batch_size=256, lr=0.01,
                          wandb_mode="disabled", **options)


def test_outcome_head_defers_only_the_harmful_mismatches_where_gain_and_fly_cannot_tell(planted, tmp_path):
    directory, test = planted
    _train(directory, tmp_path / "head", head="outcome-mlp")
    _train(directory, tmp_path / "no-ids", head="outcome-mlp", features=[*F.POSITION_FEATURES, "reply_position"])
    _train(directory, tmp_path / "no-position", head="outcome-mlp", features=[*F.POSITION_FEATURES, "draft_token", "target_token"])
    cols = rows_of(test)
    mismatch = (cols["draft_token"] != cols["target_argmax"]).numpy()
    harm = cols["outcome_harm"].numpy()[mismatch] > 0
    assert 0.25 < harm.mean() < 0.42  # answer swaps (half) late in the reply (two thirds): a third of the mismatches
    scores = {label: rules.Learned.from_pretrained(tmp_path / label).score(cols).numpy()[mismatch]
              for label in ("head", "no-ids", "no-position")}
    gain = rules.Gain().score(cols).numpy()[mismatch]
    deferred = {label: harmless_deferred(s, harm) for label, s in scores.items()}
    deferred |= {"gain": harmless_deferred(gain, harm), "fly": fly_harmless_deferred(test)}
    # at (nearly) no harm the head defers few of the harmless mismatches, Gain and FLy (blind to tokens and position)
    # nearly all; withholding the token ids (then it defers every late mismatch: half the harmless ones) or the
    # position (every answer swap: a quarter) loses most of the head's lead
    assert deferred["head"] < 0.08, deferred
    assert min(deferred["gain"], deferred["fly"]) > 0.8 and deferred["no-ids"] > 0.35 and deferred["no-position"] > 0.15, deferred


@pytest.fixture(scope="module")
def tiny_outcome_head(tmp_path_factory):
    """An outcome-mlp head on real tiny-random reference traces (which record the pair's vocabulary)."""
    from speccascade.tracing.log_traces import log_traces

    root = tmp_path_factory.mktemp("tiny-outcome")
    log_traces(root / "traces", models="tiny-random", task="arithmetic", limit=16, mode="reference", topk=0)
    train_deferral([str(root / "traces")], root / "head", head="outcome-mlp", objective="gap", epochs=2, batch_size=256,
                   wandb_mode="disabled")
    return root / "head"


def test_outcome_head_decodes_and_forced_defer_is_exact_speculative_decoding(tiny_outcome_head, pair, batch):
    ids, mask = batch
    rule = rules.Learned.from_pretrained(tiny_outcome_head)
    assert rule.head.vocab_size == pair.vocab_size and rule.granularity == "token" and rule.needs_reply
    rule.threshold = rule.head.thresholds()[0.5]  # the validation rows' median score: both decisions occur
    seen = []

    def same_as_on_traces(e):  # the decoder's decision at each draft is the one its trace row gets offline
        rows, t = torch.nonzero(e.active.unsqueeze(1).expand(-1, 4), as_tuple=True)
        q, p, x = e.q[rows, t], e.p[rows, t], e.drafts[rows, t]
        cols = F.position_features(q, p, (t + 1) / 4) | F.token_features(q, p, x) | {
            "draft_token": x, "target_argmax": p.argmax(-1), "position": e.out_index[rows] + t}
        assert torch.equal(rule.decide(cols), e.deferred[rows, t])
        seen.append(e.deferred[rows, t])

    for temperature in (0.0, 1.0):  # greedy: the head runs on the drafts alone; sampled: on every token
        SpeculativeCascade(pair, rule, block_size=4, temperature=temperature, hook=same_as_on_traces).generate(
            ids, mask, max_new_tokens=12, seed=3)
        assert 0 < torch.cat(seen).float().mean() < 1
        seen.clear()
    forced = rules.Learned.from_pretrained(tiny_outcome_head, threshold=rules.Learned.EXACT)
    out = SpeculativeCascade(pair, forced, block_size=4).generate(ids, mask, max_new_tokens=16)
    exact = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4).generate(ids, mask, max_new_tokens=16)
    assert torch.equal(out.sequences, exact.sequences) and out.stats.deferrals == out.stats.decided


def test_operating_point_reads_the_heads_token_and_position_columns(tiny_outcome_head):
    from speccascade.evaluation.operating_point import operating_point

    traces_dir = tiny_outcome_head.parent / "traces"
    picked = operating_point(str(traces_dir), f"learned:{tiny_outcome_head}", target_deferral_rate=0.3)
    assert abs(picked["deferral_rate"] - 0.3) < 0.05


def test_a_head_on_another_vocabulary_is_refused_naming_both(tiny_outcome_head):
    config = rules.Learned.from_pretrained(tiny_outcome_head).head.config()
    other = Source("pair 'other'", F.spec(), None, {}, config["provenance"]["traces"][0]["tokenizer"], config["vocab_size"] + 1)
    with pytest.raises(SpeccascadeError, match=rf"embeds token ids of a vocabulary of {config['vocab_size']} tokens; "
                                               rf"pair 'other' is of a vocabulary of {config['vocab_size'] + 1} tokens"):
        check_head("h", config, other)


def test_train_deferral_refuses_token_ids_it_cannot_size_in_one_line(planted, tmp_path, capsys):
    directory, _ = planted
    code = main(["train-deferral", "--traces", str(directory), "--out", str(tmp_path / "x"), "--head", "outcome-mlp",
                 "--objective", "outcome", "--vocab-size", "99", "--wandb-mode", "disabled"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --vocab-size 99 differs from the vocabulary of {VOCAB} tokens the traces record"]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("support", [1, 3, VOCAB])
def test_a_token_head_decides_on_the_drafters_support_as_on_the_whole_vocabulary(support):
    """Greedy decoding (support 1) and top-k sampling run the head on q~'s support only; pi is the same."""
    torch.manual_seed(0)
    features = [*F.POSITION_FEATURES, "q_tok", *CONTEXT_INPUTS]
    scalars = len(features) - 2
    rule = rules.Learned(DeferralHead(features, mean=[0.0] * scalars, std=[1.0] * scalars, vocab_size=VOCAB), threshold=0.5)
    q, p = torch.randn(3, 5, VOCAB).softmax(-1), torch.randn(3, 5, VOCAB).softmax(-1)
    top = q.topk(support, dim=-1)
    q_s = torch.zeros_like(q).scatter(-1, top.indices, top.values)
    q_s /= q_s.sum(-1, keepdim=True)
    reply_start = torch.tensor([0, 4, 9])
    mix = rule.mix(q, p, q_s, p, torch.ones(5), reply_start=reply_start)
    full = rules.TokenRule.mixture(rule.defer_tokens(q, p, torch.ones(5), None, F.live_context(p, reply_start, rule.features, True)), q_s, p)
    assert torch.allclose(mix.accept, full.accept, atol=1e-6) and torch.allclose(mix.accept.sum(-1), torch.ones(3, 5))
    assert torch.equal(mix.defer[q_s > 0], full.defer[q_s > 0]) and 0 < full.defer[q_s > 0].float().mean() < 1


def test_traces_without_the_token_columns_are_refused_in_one_line(tmp_path, capsys):
    from tests.training.test_train import planted_traces

    bare = planted_traces(tmp_path / "bare", examples=10, rows=4)  # position features and gap labels only
    code = main(["train-deferral", "--traces", str(bare), "--out", str(tmp_path / "x"), "--head", "outcome-mlp",
                 "--wandb-mode", "disabled"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lack columns ['draft_token', 'target_argmax', 'position']" in err[0]


def test_a_head_on_the_reply_position_without_reply_start_is_one_error():
    """The speculative cascade passes reply_start to rules that need it; a caller that does not gets one error line."""
    features = [*F.POSITION_FEATURES, "reply_position"]
    rule = rules.Learned(DeferralHead(features, mean=[0.0] * len(features), std=[1.0] * len(features)))
    q = torch.randn(2, 3, VOCAB).softmax(-1)
    assert rule.needs_reply and rule.granularity == "position"
    with pytest.raises(SpeccascadeError, match=r"^a head on reply_position needs reply_start, .* whose needs_reply is True\)$"):
        rule.mix(q, q, q, q, torch.ones(3))
    assert rule.mix(q, q, q, q, torch.ones(3), reply_start=torch.tensor([0, 7])).defer.shape == (2, 3)
