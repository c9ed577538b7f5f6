"""The drafter's step over the last draft on demand (``bonus_on_demand``): with the dynamic cache and a rule that
decides each position alone, it runs after the target's call and only in blocks where a row accepted every draft.
The tokens are those of running it in every block; only drafter forwards are saved."""

from __future__ import annotations

import pytest
import torch

from speccascade import load_pair
from speccascade.decoding import SpeculativeCascade
from speccascade.deferral import features as F
from speccascade.deferral import rules
from speccascade.deferral.heads import DeferralHead
from tests.conftest import DEVICE


def hidden_head_rule(threshold: float) -> rules.Learned:
    """A random position-level head that reads both models' 64-wide hidden states (the bonus step's too)."""
    torch.manual_seed(3)
    scalars = list(F.POSITION_FEATURES)
    width = len(scalars) + 2 * 64
    head = DeferralHead(scalars + ["q_hidden", "p_hidden"], hidden=8, depth=1, mean=[0.0] * width, std=[1.0] * width)
    return rules.Learned(head, threshold=threshold)


@pytest.fixture(scope="module")
def t5_sources():
    t5 = load_pair("tiny-random-t5", device=DEVICE)
    return t5, t5.encode(["hello world", "a", "the quick brown fox jumps over", "1 + 1 ="])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("model", ["decoder-only", "encoder-decoder"])
def test_the_bonus_step_on_demand_decodes_the_same_tokens_with_fewer_drafter_forwards(
        pair, batch, t5_sources, model, temperature, monkeypatch):
    """Llama-style and T5 (whose caches are compacted after every block) pairs, a batch of different lengths."""
    chosen = (rules.OPT(alpha=0.05), rules.Gain(alpha=0.02), rules.TopK(k=3))
    if model == "decoder-only":
        chosen += (hidden_head_rule(0.45),)
    else:
        pair, batch = t5_sources
    ids, mask = batch
    saved = 0
    for rule in chosen:
        on_demand = SpeculativeCascade(pair, rule, block_size=4, temperature=temperature)
        assert on_demand.bonus_on_demand, rule
        out = on_demand.generate(ids, mask, max_new_tokens=30, seed=1)
        with monkeypatch.context() as m:
            m.setattr(SpeculativeCascade, "bonus_on_demand", False)  # the drafter's last step in every block
            every = SpeculativeCascade(pair, rule, block_size=4, temperature=temperature).generate(ids, mask, max_new_tokens=30, seed=1)
        assert torch.equal(out.sequences, every.sequences), rule
        for name in ("target_calls", "drafted", "accepted", "deferrals", "decided"):
            assert getattr(out.stats, name) == getattr(every.stats, name), (rule, name)
        assert out.stats.drafted <= out.stats.drafter_calls <= every.stats.drafter_calls, rule
        saved += every.stats.drafter_calls - out.stats.drafter_calls
    assert saved > 0  # some blocks had no row accepting every draft, and skipped the step


def test_the_bonus_step_runs_in_every_block_where_something_else_reads_it_or_nothing_does(pair):
    """Off where a hook, early-stopping drafts or a block rule read ``q_{gamma+1}`` or the drafts, where the static
    cache's block must not read the host, and where nothing reads it at all (the drafter always lags)."""
    opt = rules.OPT(alpha=0.3)
    assert SpeculativeCascade(pair, opt).bonus_on_demand
    assert not SpeculativeCascade(pair, opt, hook=lambda event: None).bonus_on_demand
    assert not SpeculativeCascade(pair, opt, draft_stop=0.5).bonus_on_demand
    assert not SpeculativeCascade(pair, opt, cache="static").bonus_on_demand
    assert not SpeculativeCascade(pair, rules.FLy(theta=0.3, window=1)).bonus_on_demand
    for lagging in (SpeculativeCascade(pair, rules.AlwaysDefer()), SpeculativeCascade(pair, opt, bonus="target")):
        assert lagging.drafter_lag and not lagging.bonus_on_demand
