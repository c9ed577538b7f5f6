"""DecodeStats add up across batches, and the rates are read off the totals."""

from __future__ import annotations

import math

import pytest

from speccascade import Autoregressive, SpeculativeCascade, rules
from speccascade.decoding import DecodeStats

ADDITIVE = ("target_calls", "drafter_calls", "drafted", "accepted", "decided", "deferrals", "rejections", "new_tokens",
            "reached_at", "accepted_at", "rows")


def test_stats_of_two_batches_add_up_to_the_stats_of_one(pair, batch):
    """Rows decode the same in any batch (seed per row), so the per-row counters of two half batches
    sum to those of the whole batch; batched forwards and wall time add up as they were spent."""
    ids, mask = batch
    dec = SpeculativeCascade(pair, rules.OPT(alpha=0.3), block_size=4, temperature=1.0)
    whole = dec.generate(ids, mask, max_new_tokens=16, seed=0).stats
    first = dec.generate(ids[:2], mask[:2], max_new_tokens=16, seed=[0, 1]).stats
    second = dec.generate(ids[2:], mask[2:], max_new_tokens=16, seed=[2, 3]).stats
    total = first + second
    assert 0 < total.accepted < total.decided  # some drafts accepted, some rejected: the sums are not trivial
    for name in ADDITIVE:
        assert getattr(total, name) == getattr(whole, name), name
    assert total.target_forwards == first.target_forwards + second.target_forwards
    assert total.wall_s == pytest.approx(first.wall_s + second.wall_s)
    assert sum([first, second]) == DecodeStats.merge([first, second]) == total
    assert total.acceptance_rate == whole.acceptance_rate == total.accepted / total.decided
    assert total.deferral_rate == total.deferrals / total.decided
    assert total.tokens_per_target_call == total.new_tokens / total.target_calls
    assert total.acceptance_by_position == whole.acceptance_by_position


def test_rates_where_a_denominator_is_zero(pair, batch):
    ids, mask = batch
    target = Autoregressive(pair, "target").generate(ids, mask, max_new_tokens=4).stats
    drafter = Autoregressive(pair, "drafter").generate(ids, mask, max_new_tokens=4).stats
    assert target.tokens_per_target_call == 1.0 and target.deferral_rate == 1.0  # the target decides every token
    assert drafter.tokens_per_target_call == math.inf and drafter.deferral_rate == 0.0
    assert math.isnan(target.acceptance_rate) and target.rejection_rate == 0.0
    empty = DecodeStats.merge([])
    assert empty == DecodeStats() and math.isnan(empty.deferral_rate) and math.isnan(empty.tokens_per_s)


def test_blocks_of_different_sizes_merge_position_by_position():
    short = DecodeStats(accepted=3, decided=6, reached_at=[4, 2], accepted_at=[2, 1])
    long = DecodeStats(accepted=8, decided=10, reached_at=[4, 4, 2], accepted_at=[4, 2, 2])
    total = short + long
    assert total.acceptance_by_position == [6 / 8, 3 / 6, 1.0]
    saved = total.as_dict()
    assert saved["reached_at"] == [8, 6, 2] and saved["acceptance_by_position"] == [6 / 8, 3 / 6, 1.0]
    assert saved["acceptance_rate"] == 11 / 16  # the rates come along, read off the totals
