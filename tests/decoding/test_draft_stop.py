"""Adaptive blocks (``draft_stop``): a row stops drafting where the drafter's top-1 probability falls below
the threshold. Every limit of algorithms.md section 6 still holds, and blocks really end early."""

from __future__ import annotations

import pytest
import torch

from speccascade import Autoregressive, SpeculativeCascade, rules
from speccascade.errors import SpeccascadeError
from tests.decoding.test_distribution import GAMMA, chi_square_p, empirical_joint, small_pair, target_joint  # noqa: F401
from tests.decoding.test_exactness import MAX_NEW, row, target_greedy  # noqa: F401

STOP = 0.1  # between the 25% and 75% quantiles of the tiny pair's top-1 drafter probabilities: some rows stop, some go on


@pytest.mark.parametrize("bonus", ["mix", "target"])
@pytest.mark.parametrize("rule", [rules.AlwaysDefer(), rules.Chow(alpha=0.0), rules.TokenV3(alpha=0.0)], ids=repr)
def test_forced_defer_with_adaptive_blocks_equals_target_generate(pair, batch, target_greedy, rule, bonus):
    ids, mask = batch
    dec = SpeculativeCascade(pair, rule, block_size=4, temperature=0, bonus=bonus, draft_stop=STOP)
    out = dec.generate(ids, mask, max_new_tokens=MAX_NEW)
    assert out.new_tokens.tolist() == target_greedy
    assert dec.generate(row(ids, mask, 1), max_new_tokens=MAX_NEW).new_tokens[0].tolist() == target_greedy[1]


@pytest.mark.parametrize("rule", [rules.NeverDefer(), rules.OPT(alpha=0.3), rules.TokenV3(alpha=0.3)], ids=repr)
def test_greedy_cascades_decode_the_same_tokens_with_shorter_blocks(pair, batch, rule):
    """A greedy cascade's token at each position does not depend on where blocks end (its bonus comes
    from pi, which reads the drafter's q at the stop), so adaptive blocks change the cost, not the tokens."""
    ids, mask = batch
    fixed = SpeculativeCascade(pair, rule, block_size=4, temperature=0).generate(ids, mask, max_new_tokens=MAX_NEW)
    adaptive = SpeculativeCascade(pair, rule, block_size=4, temperature=0, draft_stop=STOP).generate(
        ids, mask, max_new_tokens=MAX_NEW)
    assert torch.equal(fixed.sequences, adaptive.sequences)
    if isinstance(rule, rules.NeverDefer):
        drafter = Autoregressive(pair, "drafter", temperature=0).generate(ids, mask, max_new_tokens=MAX_NEW)
        assert torch.equal(adaptive.sequences, drafter.sequences)
    s = adaptive.stats
    assert s.drafted < fixed.stats.drafted and s.accepted + s.rejections == s.decided


def test_blocks_end_at_the_first_unsure_drafter_position(pair):
    """One row: each block drafts up to the first position whose top-1 drafter probability is below the
    threshold (or gamma), read off the drafter's own probabilities over the emitted tokens."""
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    gamma = 4
    lengths = []

    class Recorded(SpeculativeCascade):
        def draft(self, state, gamma):
            start = state.out.emitted.clone()
            drafts, q, limit, lag = super().draft(state, gamma)
            lengths.append((int(start), int(limit)))
            return drafts, q, limit, lag

    out = Recorded(pair, rules.NeverDefer(), block_size=gamma, temperature=0, draft_stop=STOP).generate(ids, max_new_tokens=MAX_NEW)
    tokens = out.new_tokens[0]
    with torch.no_grad():
        sure = pair.drafter(torch.cat([ids[0], tokens]).unsqueeze(0)).logits[0, ids.shape[1] - 1 :].softmax(-1).max(-1).values >= STOP
    for start, limit in lengths[:-1]:  # never defer: every draft is accepted, so blocks start at limit + 1 apart
        expected = next((k for k in range(1, gamma) if not sure[start + k]), gamma)
        assert limit == expected, (start, limit)
    assert len({limit for _, limit in lengths}) > 1
    assert out.stats.drafter_calls == out.stats.drafter_forwards  # one row: the calls are the batch's forwards


def test_forced_defer_with_adaptive_blocks_emits_the_target_distribution(small_pair):  # noqa: F811
    with torch.no_grad():
        top1 = small_pair.drafter(torch.tensor([[3, 1, 4, 1, 5]])).logits[0, -1].softmax(-1).max()
    dec = SpeculativeCascade(small_pair, rules.AlwaysDefer(), block_size=GAMMA, temperature=1.0, draft_stop=float(top1) * 1.2)
    observed = empirical_joint(dec)
    assert dec.generate(torch.tensor([[3, 1, 4, 1, 5]]).repeat(64, 1), max_new_tokens=2).stats.drafted < 64 * GAMMA
    assert chi_square_p(observed, target_joint(small_pair, dec.sampler)) > 1e-3


class FullBlockResidual(SpeculativeCascade):
    """Broken: a row whose block the stop ended draws from the residual, as if its next draft had been rejected."""

    def resample(self, state, n, limit, q_s, emit):
        return super().resample(state, n, torch.full_like(limit, self.block_size), q_s, emit)


def test_the_distribution_test_catches_a_stop_taken_for_a_rejection(small_pair):  # noqa: F811
    dec = FullBlockResidual(small_pair, rules.AlwaysDefer(), block_size=GAMMA, temperature=1.0, draft_stop=0.99)
    assert chi_square_p(empirical_joint(dec), target_joint(small_pair, dec.sampler)) < 1e-6


@pytest.mark.parametrize("options, message", [
    (dict(draft_stop=1.0), "draft_stop must lie in [0, 1), got 1.0"),
    (dict(draft_stop=-0.1), "draft_stop must lie in [0, 1), got -0.1"),
    (dict(draft_stop=0.4, cache="static"), "draft_stop needs the dynamic cache"),
    (dict(draft_stop=0.4, hook=lambda e: None), "draft_stop cannot run with a hook"),
])
def test_bad_draft_stop_is_refused(pair, options, message):
    with pytest.raises(SpeccascadeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4, **options)
