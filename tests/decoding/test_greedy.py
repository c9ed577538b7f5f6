"""The greedy fast paths settle blocks as the general path does: exact speculative decoding's (``match_target``) and
position-level cascades' (``keep_or_match``); a hook keeps the general path and sees both models' hidden states."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from speccascade.decoding import SpeculativeCascade
from speccascade.decoding.cascade import Dists
from speccascade.decoding.sampling import RandomStreams
from speccascade.decoding.state import Aranges
from speccascade.decoding.stats import Counters
from speccascade.deferral import rules
from speccascade.deferral.heads import DeferralHead
from speccascade.deferral.rules import AlwaysDefer, Learned


def random_block(gamma: int, batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drafts (the drafter's argmaxes) and both models' logits ``[B, gamma + 1, V]``, the target agreeing with
    a random prefix of each row's drafts (any length, the whole block included)."""
    gen = torch.Generator().manual_seed(seed)
    q_logits = torch.randn(batch, gamma + 1, vocab, generator=gen)
    p_logits = torch.randn(batch, gamma + 1, vocab, generator=gen)
    drafts = q_logits[:, :gamma].argmax(-1)
    agree = torch.arange(gamma) < torch.randint(0, gamma + 1, (batch, 1), generator=gen)
    p_logits[:, :gamma].scatter_(-1, drafts.unsqueeze(-1), torch.where(agree, 10.0, -10.0).unsqueeze(-1))
    return drafts, q_logits, p_logits


def fake_state(batch: int, gamma: int, emitted: torch.Tensor, seed: int) -> SimpleNamespace:
    """The parts of a decode state that accepting and resampling read."""
    return SimpleNamespace(
        slots=SimpleNamespace(first=Aranges(gamma + 1, torch.device("cpu"))), rows=torch.arange(batch),
        out=SimpleNamespace(emitted=emitted, emitted_column=emitted.unsqueeze(1), done=torch.zeros(batch, dtype=torch.bool),
                            counts=Counters(batch, gamma, torch.device("cpu"))),
        streams=RandomStreams(RandomStreams.row_seeds(seed, batch), 64, torch.device("cpu")))


def settle_both(decoder: SpeculativeCascade, fast_path, block, seed: int, draft_stop: float):
    """Settle one random ``block`` (drafts, q and p logits) by ``fast_path`` and by the general path, on the same
    state and limits, and assert they agree: the same accepted count, next token, deferrals and emitted tokens.
    Returns the fast path's :class:`Outcome` and the general path's."""
    drafts, q_logits, p_logits = block
    batch, gamma = drafts.shape
    gen = torch.Generator().manual_seed(seed + 100)
    limit = torch.randint(1, gamma + 1, (batch,), generator=gen) if draft_stop else torch.full((batch,), gamma)
    state = fake_state(batch, gamma, torch.randint(0, 40, (batch,), generator=gen), seed)
    q, p = Dists([q_logits], decoder.sampler), Dists([p_logits], decoder.sampler)
    fast = fast_path(state, drafts, q, p, limit)
    general = decoder.accept_and_resample(state, drafts, q, p, limit)
    assert torch.equal(fast.n, general.n) and torch.equal(fast.next_token, general.next_token)
    assert torch.equal(fast.deferred, general.deferred)
    emitted = torch.arange(gamma + 1) <= fast.n.unsqueeze(1)  # the tokens a block emits
    assert torch.equal(fast.tokens[emitted], general.tokens[emitted])
    return fast, general


@pytest.mark.parametrize("bonus", ["mix", "target"])
@pytest.mark.parametrize("draft_stop", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(8))
def test_matching_the_target_settles_blocks_as_accepting_and_resampling_does(pair, bonus, draft_stop, seed):
    gamma, batch, vocab = 5, 6, 50
    decoder = SpeculativeCascade(pair, AlwaysDefer(), block_size=gamma, bonus=bonus, draft_stop=draft_stop)
    assert decoder.greedy_exact
    fast, _ = settle_both(decoder, decoder.match_target, random_block(gamma, batch, vocab, seed), seed, draft_stop)
    assert len(set(fast.n.tolist())) > 1  # the blocks end at different drafts


def test_a_hook_sees_both_models_hidden_states(pair, batch):
    events = []
    decoder = SpeculativeCascade(pair, AlwaysDefer(), block_size=3, hook=events.append, hook_hidden_states=True)
    ids, mask = batch
    decoder.generate(ids, mask, max_new_tokens=8)
    assert events and not decoder.greedy_exact  # a hook takes the general path
    for event in events:
        assert event.q_hidden is not None and event.p_hidden is not None
        assert event.q_hidden.shape[:2] == event.p_hidden.shape[:2] == (ids.shape[0], 4)


def cascade_block(gamma: int, batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drafts (the drafter's argmaxes) and both models' logits ``[B, gamma + 1, V]``, from flat to sharp (scaled by
    0.3 to 5 per position), the target agreeing with each draft with probability 0.6: position rules both defer
    and keep, and a kept disagreement may be followed by agreements (what FLy keeps)."""
    gen = torch.Generator().manual_seed(seed)
    q_scale, p_scale = (0.3 + 4.7 * torch.rand(2, batch, gamma + 1, 1, generator=gen)).unbind(0)
    q_logits = torch.randn(batch, gamma + 1, vocab, generator=gen) * q_scale
    p_logits = torch.randn(batch, gamma + 1, vocab, generator=gen) * p_scale
    drafts = q_logits[:, :gamma].argmax(-1)
    agree = torch.rand(batch, gamma, generator=gen) < 0.6
    p_logits[:, :gamma].scatter_(-1, drafts.unsqueeze(-1), torch.where(agree, 10.0, -10.0).unsqueeze(-1))
    return drafts, q_logits, p_logits


def position_head_rule(threshold: float) -> Learned:
    """A learned position-level head with random weights (its decisions vary with the features it reads)."""
    torch.manual_seed(3)
    return Learned(DeferralHead(["q_top1", "p_top1", "tv", "rel_position"], hidden=8, depth=1), threshold=threshold)


MIXTURES = [rules.Chow(alpha=0.5), rules.Diff(alpha=0.0), rules.OPT(alpha=0.5), rules.BiLD(alpha=0.5),
            rules.Gain(alpha=0.2), rules.KLJudge(alpha=3.0, tau=0.99), rules.JS(alpha=0.5), rules.Entropy(alpha=2.0),
            rules.FLy(theta=0.3, window=1), rules.NeverDefer(), position_head_rule(0.53)]


@pytest.mark.parametrize("rule", MIXTURES, ids=lambda rule: rule.name + ("" if rule.knob is None else f":{rule.cut:g}"))
@pytest.mark.parametrize("bonus", ["mix", "target"])
@pytest.mark.parametrize("draft_stop", [0.0, 0.5])
def test_keeping_or_matching_settles_cascade_blocks_as_accepting_and_resampling_does(pair, rule, bonus, draft_stop):
    """Greedy decoding with a position-level mixture rule: the fast path emits the general path's tokens, ends
    blocks at the same draft and records the same deferrals, on random blocks where the rule both defers and
    keeps and the target both agrees and disagrees."""
    gamma, batch, vocab = 5, 6, 50
    decoder = SpeculativeCascade(pair, rule, block_size=gamma, bonus=bonus, draft_stop=draft_stop)
    assert decoder.greedy_mixture and not decoder.greedy_exact
    ends, deferred = set(), set()
    for seed in range(6):
        fast, general = settle_both(decoder, decoder.keep_or_match, cascade_block(gamma, batch, vocab, seed), seed, draft_stop)
        ends |= set(fast.n.tolist())
        deferred |= set(general.deferred.flatten().tolist())
    if isinstance(rule, rules.NeverDefer):
        assert deferred == {False} and ends == ({gamma} if not draft_stop else set(range(1, gamma + 1)))  # every draft kept
    else:
        assert len(ends) > 2 and deferred == {True, False}  # blocks end at different drafts; the rule defers and keeps


def test_only_greedy_position_mixtures_without_a_hook_take_the_fast_path(pair):
    """Token-level rules, lossy speculative decoding, sampling and a hook keep the general path; a greedy cascade
    with a position rule never reaches it."""
    assert not SpeculativeCascade(pair, rules.TokenV3(alpha=0.5)).greedy_mixture
    assert not SpeculativeCascade(pair, rules.LossySD(alpha=0.3)).greedy_mixture
    assert not SpeculativeCascade(pair, rules.OPT(alpha=0.5), temperature=1.0).greedy_mixture
    assert not SpeculativeCascade(pair, rules.OPT(alpha=0.5), hook=lambda event: None).greedy_mixture

    class FastOnly(SpeculativeCascade):
        def accept_and_resample(self, *args, **kwargs):
            raise AssertionError("the general path ran")

    ids = torch.tensor([[5, 17, 42, 9, 3]])
    out = FastOnly(pair, rules.OPT(alpha=0.5), block_size=4).generate(ids, max_new_tokens=12)
    assert out.stats.new_tokens == 12


def test_exact_decodings_mix_is_the_rules_own(pair):
    """The decoder knows exact speculative decoding's mix without asking the rule: the same ``pi`` and ``r``."""
    gamma, batch, vocab = 4, 3, 30
    decoder = SpeculativeCascade(pair, AlwaysDefer(), block_size=gamma, temperature=1.0)
    drafts, q_logits, p_logits = cascade_block(gamma, batch, vocab, seed=0)
    q, p = Dists([q_logits], decoder.sampler), Dists([p_logits], decoder.sampler)
    state = fake_state(batch, gamma, torch.zeros(batch, dtype=torch.long), seed=0)
    known = decoder.mix(state, drafts, q, p, q.sampled, p.sampled)
    asked = AlwaysDefer().mix(q.probs, p.probs, q.sampled, p.sampled, drafts=drafts)
    assert all(torch.equal(a, b) for a, b in zip(known, asked))
