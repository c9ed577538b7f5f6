"""Encoder-decoder (T5) pairs in the same decoder: section 6's limits on ``tiny-random-t5``.

T5's decoder reads positions as slot distances, so the decoder keeps each row's slots together
(compaction after every step); these tests fail if a rejected slot is left between tokens.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from speccascade import Autoregressive, SpeculativeCascade, load_pair, rules
from speccascade.decoding import ModelPair, tiny_random_pair, tiny_random_t5_pair
from speccascade.deferral import features as F
from speccascade.deferral.heads import DeferralHead
from speccascade.deferral.rules import FIXED_RULES
from speccascade.errors import SpeccascadeError
from tests.conftest import DEVICE
from tests.helpers import row

SOURCES = ["hello world", "a", "the quick brown fox jumps over", "1 + 1 ="]
MAX_NEW = 20


@pytest.fixture(scope="module")
def t5():
    return load_pair("tiny-random-t5", device=DEVICE)


@pytest.fixture(scope="module")
def sources(t5):
    return t5.encode(SOURCES)


def learned_exact() -> rules.Learned:
    torch.manual_seed(0)
    features = list(F.POSITION_FEATURES)
    return rules.Learned(DeferralHead(features, mean=[0.0] * len(features), std=[1.0] * len(features)), rules.Learned.EXACT)


@pytest.mark.parametrize("rule", [rules.AlwaysDefer(), rules.OPT(alpha=rules.OPT.EXACT), rules.TokenV3(alpha=rules.TokenV3.EXACT),
                                  learned_exact()], ids=["always", "opt", "tokenv3", "learned"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_forced_defer_greedy_equals_target_generate(t5, sources, rule, block_size):
    ids, mask = sources
    expected = t5.target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    seen = []
    dec = SpeculativeCascade(t5, rule, block_size=block_size, hook=lambda e: seen.append(e.n_accepted[e.active]))
    out = dec.generate(ids, mask, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected[:, : out.sequences.shape[1]])  # decoder start token + new tokens
    single = SpeculativeCascade(t5, rule, block_size=block_size).generate(row(ids, mask, 2), max_new_tokens=MAX_NEW)
    assert torch.equal(single.sequences[0], expected[2, : single.sequences.shape[1]])
    if block_size > 1:
        assert any(len(set(n.tolist())) > 1 for n in seen)  # rows diverged: rejected slots had to be squeezed out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_never_defer_equals_drafter_decoding(t5, sources, temperature):
    ids, mask = sources
    drafter = Autoregressive(t5, "drafter", temperature=temperature).generate(ids, mask, MAX_NEW, seed=3)
    out = SpeculativeCascade(t5, rules.NeverDefer(), block_size=3, temperature=temperature).generate(ids, mask, MAX_NEW, seed=3)
    assert torch.equal(out.sequences, drafter.sequences)
    if temperature == 0:
        hf = t5.drafter.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
        assert torch.equal(out.sequences, hf[:, : out.sequences.shape[1]])


def test_every_rule_at_its_drafter_only_knob_accepts_every_draft(t5, sources):
    ids, mask = sources
    for cls in FIXED_RULES.values():
        if cls.knob is None or cls.DRAFTER_ONLY is None:
            continue
        out = SpeculativeCascade(t5, cls(**{cls.knob: cls.DRAFTER_ONLY}), block_size=4, temperature=1.0).generate(ids, mask, 12, seed=1)
        assert out.stats.new_tokens == 4 * 12 and out.stats.accepted == out.stats.decided, cls.name


V, N, GAMMA = 8, 20_000, 3
SOURCE = torch.tensor([[3, 1, 4, 1, 5]], device=DEVICE)


def test_forced_defer_at_t1_emits_the_target_distribution():
    """The joint law of the first two tokens matches the target's (chi-square, as for decoder-only pairs)."""
    pair = tiny_random_t5_pair(seed=5, vocab_size=V, device=DEVICE)
    torch.manual_seed(1)
    with torch.no_grad():  # over 8 tokens both are one-hot on the same token: soften both, move the drafter away
        pair.target.lm_head.weight.mul_(0.03)
        pair.drafter.lm_head.weight.mul_(0.03).add_(0.03 * torch.randn_like(pair.drafter.lm_head.weight))
    start = torch.full((V, 1), pair.decoder_start_token_id, device=DEVICE)
    with torch.no_grad():
        first = pair.target(input_ids=SOURCE, decoder_input_ids=start[:1]).logits[0, -1].softmax(-1)
        prefixes = torch.cat([start, torch.arange(V, device=DEVICE).unsqueeze(1)], dim=1)
        second = pair.target(input_ids=SOURCE.repeat(V, 1), decoder_input_ids=prefixes).logits[:, -1].softmax(-1)
        q = pair.drafter(input_ids=SOURCE, decoder_input_ids=start[:1]).logits[0, -1].softmax(-1)
    assert 0.5 * (first - q).abs().sum() > 0.1  # the drafter differs, so a wrong decoder would show
    expected = (first.unsqueeze(1) * second).flatten().double().cpu() * N
    out = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=GAMMA, temperature=1.0).generate(
        SOURCE.repeat(N, 1), max_new_tokens=2, seed=list(range(N)))
    x = out.new_tokens
    observed = torch.bincount((x[:, 0] * V + x[:, 1]).cpu(), minlength=V * V).double()
    keep = expected >= 5
    rare = [observed[~keep].sum(0, keepdim=True)] if (~keep).any() else []  # pool the rare cells
    obs = torch.cat([observed[keep], *rare])
    exp = torch.cat([expected[keep], *([expected[~keep].sum(0, keepdim=True)] if rare else [])])
    assert chisquare(obs.numpy(), (exp * obs.sum() / exp.sum()).numpy()).pvalue > 1e-3


def test_mixed_pair_and_static_cache_are_refused(t5):
    llama = tiny_random_pair(seed=0)
    with pytest.raises(SpeccascadeError, match="drafter 'd' is decoder-only, target 't' is encoder-decoder"):
        ModelPair(llama.drafter, t5.target, t5.tokenizer, "mixed", "d", "t")
    ids, mask = t5.encode(["hi"])
    with pytest.raises(SpeccascadeError, match="encoder-decoder models run with the dynamic cache"):
        SpeculativeCascade(t5, rules.AlwaysDefer(), cache="static").generate(ids, mask, 4)


def test_local_t5_checkpoints_load_as_an_encoder_decoder_pair(t5, tmp_path):
    for name in ("drafter", "target"):
        getattr(t5, name).save_pretrained(tmp_path / name)
        t5.tokenizer.save_pretrained(tmp_path / name)
    pair = load_pair(drafter=str(tmp_path / "drafter"), target=str(tmp_path / "target"), device=DEVICE)
    assert pair.is_encoder_decoder and pair.decoder_start_token_id == 0
    ids, mask = pair.encode(SOURCES[:2])
    ours = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3).generate(ids, mask, 8)
    reference = SpeculativeCascade(t5, rules.AlwaysDefer(), block_size=3).generate(ids, mask, 8)
    assert torch.equal(ours.sequences, reference.sequences)
    with pytest.raises(SpeccascadeError, match="cannot find the decoder layer stack"):
        load_pair(target=str(tmp_path / "target"), drafter_layers=[0])
