"""Greedy exact speculative decoding's fast path (``match_target``) settles blocks as the general path does; a hook
keeps the general path and sees both models' hidden states."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from speccascade.decoding import SpeculativeCascade
from speccascade.decoding.cascade import Dists
from speccascade.decoding.sampling import RandomStreams
from speccascade.deferral.rules import AlwaysDefer


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
        slots=SimpleNamespace(slot=torch.arange(gamma + 1)), rows=torch.arange(batch),
        out=SimpleNamespace(emitted=emitted), streams=RandomStreams(RandomStreams.row_seeds(seed, batch), 64, torch.device("cpu")))


@pytest.mark.parametrize("bonus", ["mix", "target"])
@pytest.mark.parametrize("draft_stop", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(8))
def test_matching_the_target_settles_blocks_as_accepting_and_resampling_does(pair, bonus, draft_stop, seed):
    gamma, batch, vocab = 5, 6, 50
    decoder = SpeculativeCascade(pair, AlwaysDefer(), block_size=gamma, bonus=bonus, draft_stop=draft_stop)
    assert decoder.greedy_exact
    drafts, q_logits, p_logits = random_block(gamma, batch, vocab, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    limit = torch.randint(1, gamma + 1, (batch,), generator=gen) if draft_stop else torch.full((batch,), gamma)
    state = fake_state(batch, gamma, torch.randint(0, 40, (batch,), generator=gen), seed)
    active = torch.rand(batch, generator=gen) < 0.8
    q, p = Dists(q_logits, decoder.sampler), Dists(p_logits, decoder.sampler)
    fast = decoder.match_target(state, drafts, q, p, limit, active)
    general = decoder.accept_and_resample(state, drafts, q, p, limit, active)
    assert torch.equal(fast.n, general.n) and torch.equal(fast.next_token, general.next_token)
    assert torch.equal(fast.deferred, general.deferred)
    emitted = torch.arange(gamma + 1) <= fast.n.unsqueeze(1)  # the tokens a block emits
    assert torch.equal(fast.tokens[emitted], general.tokens[emitted])
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
