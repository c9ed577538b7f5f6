"""algorithms.md section 6, limits 1, 3 and 4: forced defer is the target, forced keep is the drafter."""

from __future__ import annotations

import pytest
import torch

from speccascade import Autoregressive, SequentialCascade, SpeculativeCascade, rules
from speccascade.deferral.rules import FIXED_RULES
from tests.helpers import row

MAX_NEW = 24
EXACT_RULES = [cls(**({cls.knob: cls.EXACT} if cls.knob else {})) for cls in FIXED_RULES.values() if cls.EXACT is not None]
EXACT_RULES.append(rules.AlwaysDefer())


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def target_greedy(pair, batch):
    ids, mask = batch
    return [hf_greedy(pair.target, row(ids, mask, b), MAX_NEW) for b in range(ids.shape[0])]


@pytest.mark.parametrize("rule", EXACT_RULES, ids=lambda r: repr(r))
@pytest.mark.parametrize("block_size", [1, 4])
def test_forced_defer_greedy_equals_target_generate(pair, batch, target_greedy, rule, block_size):
    ids, mask = batch
    dec = SpeculativeCascade(pair, rule, block_size=block_size, temperature=0)
    out = dec.generate(ids, mask, max_new_tokens=MAX_NEW)
    assert out.new_tokens.tolist() == target_greedy  # each batch row equals its row decoded alone
    single = dec.generate(row(ids, mask, 2), max_new_tokens=MAX_NEW)
    assert single.new_tokens[0].tolist() == target_greedy[2]
    assert out.stats.deferrals == out.stats.decided  # every examined draft was deferred


def test_batch_rows_accept_different_numbers_of_drafts(pair, batch):
    """The batch test above is only meaningful if rows really diverge within a block."""
    ids, mask = batch
    seen = []
    dec = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4, temperature=0, hook=lambda e: seen.append(e.n_accepted[e.active]))
    dec.generate(ids, mask, max_new_tokens=MAX_NEW)
    assert any(len(set(n.tolist())) > 1 for n in seen)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_never_defer_equals_drafter_decoding(pair, batch, temperature):
    ids, mask = batch
    drafter = Autoregressive(pair, "drafter", temperature=temperature).generate(ids, mask, max_new_tokens=MAX_NEW, seed=7)
    out = SpeculativeCascade(pair, rules.NeverDefer(), block_size=3, temperature=temperature).generate(
        ids, mask, max_new_tokens=MAX_NEW, seed=7
    )
    assert torch.equal(out.sequences, drafter.sequences)
    assert out.stats.accepted == out.stats.decided and out.stats.rejections == 0
    if temperature == 0:
        assert out.new_tokens[0].tolist() == hf_greedy(pair.drafter, row(ids, mask, 0), MAX_NEW)


@pytest.mark.parametrize(
    "rule",
    [cls(**{cls.knob: cls.DRAFTER_ONLY}) for cls in FIXED_RULES.values() if cls.DRAFTER_ONLY is not None]
    + [rules.TopK(k=10_000)],
    ids=lambda r: repr(r),
)
def test_drafter_only_setting_accepts_every_draft(pair, batch, rule):
    ids, mask = batch
    out = SpeculativeCascade(pair, rule, block_size=4, temperature=1.0).generate(ids, mask, max_new_tokens=16)
    assert out.stats.rejections == 0 and out.stats.accepted == out.stats.decided > 0
    assert out.stats.deferrals == 0


def test_target_only_baseline_equals_hf_generate(pair, batch, target_greedy):
    ids, mask = batch
    out = Autoregressive(pair, "target", temperature=0).generate(ids, mask, max_new_tokens=MAX_NEW)
    assert out.new_tokens.tolist() == target_greedy
    assert out.stats.target_calls == len(target_greedy) * MAX_NEW


def test_sequential_cascade_limits(pair, batch, target_greedy):
    ids, mask = batch
    always = SequentialCascade(pair, rules.Chow(alpha=rules.Chow.EXACT), temperature=0).generate(ids, mask, max_new_tokens=MAX_NEW)
    assert always.new_tokens.tolist() == target_greedy
    never = SequentialCascade(pair, rules.Chow(alpha=rules.Chow.DRAFTER_ONLY), temperature=1.0).generate(ids, mask, max_new_tokens=MAX_NEW, seed=3)
    drafter = Autoregressive(pair, "drafter", temperature=1.0).generate(ids, mask, max_new_tokens=MAX_NEW, seed=3)
    assert torch.equal(never.sequences, drafter.sequences) and never.stats.target_calls == 0


def test_sequential_cascade_mixes_and_catches_up(pair, batch):
    """Some tokens deferred, some not: the lagging target cache must catch up exactly."""
    ids, mask = batch
    rule = rules.Chow(alpha=0.9)
    out = SequentialCascade(pair, rule, temperature=0).generate(ids, mask, max_new_tokens=MAX_NEW)
    assert 0 < out.stats.deferrals < out.stats.decided
    # replay: each token is the target's argmax where Chow defers, the drafter's otherwise
    for b in range(ids.shape[0]):
        prefix = row(ids, mask, b)
        for token in out.new_tokens[b].tolist():
            with torch.no_grad():
                q = pair.drafter(prefix).logits[0, -1].softmax(-1)
                p = pair.target(prefix).logits[0, -1]
            expected = p.argmax() if q.max() < 1 - rule.alpha else q.argmax()
            assert token == int(expected)
            prefix = torch.cat([prefix, prefix.new_tensor([[token]])], dim=1)


def test_stats_are_consistent(pair, batch):
    ids, mask = batch
    gamma = 4
    out = SpeculativeCascade(pair, rules.OPT(alpha=0.5), block_size=gamma, temperature=1.0).generate(ids, mask, max_new_tokens=20)
    s = out.stats
    assert 1 <= s.tokens_per_target_call <= gamma + 1
    assert s.new_tokens == sum(r["new_tokens"] for r in s.rows) == 20 * ids.shape[0]
    assert s.drafted == gamma * s.target_calls and s.drafter_calls == (gamma + 1) * s.target_calls
    assert s.accepted + s.rejections == s.decided
    assert all(0 <= a <= 1 for a in s.acceptance_by_position)


def test_eos_stops_a_row_and_pads_it(pair, batch):
    ids, mask = batch
    free = Autoregressive(pair, "target", temperature=0).generate(ids, mask, max_new_tokens=MAX_NEW).new_tokens
    eos = int(free[0, 5])  # pretend row 0's sixth token is the end of sequence
    pair.target.generation_config.eos_token_id = eos
    try:
        out = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4, temperature=0).generate(ids, mask, max_new_tokens=MAX_NEW)
    finally:
        pair.target.generation_config.eos_token_id = 2
    first = free[0].tolist().index(eos)
    assert out.new_tokens[0, : first + 1].tolist() == free[0, : first + 1].tolist()
    assert (out.new_tokens[0, first + 1 :] == pair.pad_token_id).all()
    assert out.stats.rows[0]["new_tokens"] == first + 1


@pytest.mark.parametrize("rule", [rules.AlwaysDefer(), rules.OPT(alpha=0.3), rules.TokenV3(alpha=0.3)], ids=repr)
def test_greedy_blocks_cut_to_the_tokens_left_change_nothing(pair, batch, rule):
    """Greedy decoding drafts only as many tokens as the rows still need; the static cache (fixed
    blocks) and a hook (which sees whole blocks) decode the same tokens with full blocks."""
    ids, mask = batch
    cut = SpeculativeCascade(pair, rule, block_size=4).generate(ids, mask, max_new_tokens=11)
    full = SpeculativeCascade(pair, rule, block_size=4, cache="static").generate(ids, mask, max_new_tokens=11)
    hooked = SpeculativeCascade(pair, rule, block_size=4, hook=lambda e: None).generate(ids, mask, max_new_tokens=11)
    assert torch.equal(cut.sequences, full.sequences) and torch.equal(cut.sequences, hooked.sequences)
    assert cut.stats.drafted < full.stats.drafted == hooked.stats.drafted


def test_bonus_from_the_target_takes_the_drafter_between_target_tokens_and_saves_its_last_step(pair):
    """``bonus="target"`` with never defer: gamma drafter tokens, then the target's own next token, in turn;
    the drafter runs gamma steps per block, not gamma + 1; forced defer is still the target."""
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    gamma, new = 3, 12
    out = SpeculativeCascade(pair, rules.NeverDefer(), block_size=gamma, temperature=0, bonus="target").generate(
        ids, max_new_tokens=new)
    tokens = out.new_tokens[0].tolist()
    for i, token in enumerate(tokens):
        prefix = torch.cat([ids, torch.tensor([tokens[:i]], dtype=ids.dtype)], dim=1)
        model = pair.target if i % (gamma + 1) == gamma else pair.drafter
        assert token == hf_greedy(model, prefix, 1)[0], i
    default = SpeculativeCascade(pair, rules.NeverDefer(), block_size=gamma, temperature=0).generate(ids, max_new_tokens=new)
    assert out.stats.drafter_calls == gamma * out.stats.target_calls < default.stats.drafter_calls
    exact = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=gamma, temperature=0, bonus="target").generate(
        ids, max_new_tokens=new)
    assert exact.new_tokens[0].tolist() == hf_greedy(pair.target, ids, new)
