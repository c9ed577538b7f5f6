"""FLy, the block rule (algorithms.md, "Block rules"): its spelling, the entropy gate, the deferred
window, its exact knob, and its refusal where only per-position trace rows exist.

Hand-built blocks with V = 4; the worked numbers are in the comments. A loop written from the
definition checks the vectorised rule on random blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

from speccascade import SpeculativeCascade
from speccascade.deferral import rules
from speccascade.deferral.rules import FLy
from speccascade.errors import SpeccascadeError
from speccascade.evaluation import offline

# top-3 entropy of UNSURE: -(0.4 ln 0.4 + 0.35 ln 0.35 + 0.25 ln 0.25) = 0.3665 + 0.3674 + 0.3466 = 1.0805
UNSURE, H_UNSURE = [0.4, 0.35, 0.25, 0.0], 1.0805
# SURE (argmax 1): -(0.85 ln 0.85 + 2 * 0.05 ln 0.05) = 0.1381 + 0.2996 = 0.4377
SURE, H_SURE = [0.05, 0.85, 0.05, 0.05], 0.4377


def block(*rows: list[float]) -> torch.Tensor:
    """One batch row of target distributions over the block's positions, [1, len(rows), V]."""
    return torch.tensor([list(rows)], dtype=torch.float32)


def kept(rule: FLy, p: torch.Tensor, drafts: list[int]) -> list[bool]:
    """Where the rule keeps the draft (r = 0), over the drafted positions."""
    return (~rule.defer(p, torch.tensor([drafts]))[0, : len(drafts)]).tolist()


@pytest.mark.parametrize("spec, expected", [
    ("fly", FLy()), ("fly:0.3", FLy(theta=0.3)), ("FLY:0.5:window=4", FLy(theta=0.5, window=4)),
    ("fly:window=1", FLy(window=1)), ("fly:inf", FLy(theta=math.inf)),
])
def test_parse_reads_fly_and_its_window(spec, expected):
    rule = rules.parse(spec).build()
    assert rule == expected and isinstance(rule.window, int)
    assert rules.parse(rule.spec).build() == rule  # the spelling round-trips


@pytest.mark.parametrize("spec", ["fly:0.3:window=0", "fly:0.3:window=2.5", "fly:window=inf", "fly:window=-1"])
def test_parse_refuses_a_window_that_is_no_positive_whole_number(spec):
    with pytest.raises(SpeccascadeError, match="whole number window >= 1"):
        rules.parse(spec)


def test_gate_keeps_a_mismatch_only_above_the_entropy_threshold():
    # draft 2 at position 0 is a mismatch (argmax p = 0); draft 1 at position 1 agrees (argmax 1)
    p, drafts = block(UNSURE, SURE, SURE), [2, 1, 1]
    assert kept(FLy(theta=H_UNSURE - 1e-3, window=1), p, drafts)[0]
    assert not kept(FLy(theta=H_UNSURE + 1e-3, window=1), p, drafts)[0]
    # the same mismatch where the target is sure: kept only by a gate below H(SURE)
    p = block(SURE, SURE, SURE)
    assert not kept(FLy(theta=0.5, window=1), p, [0, 1, 1])[0]
    assert kept(FLy(theta=H_SURE - 1e-3, window=1), p, [0, 1, 1])[0]


def test_matches_always_defer_so_speculative_decodings_test_decides_them():
    p = block(UNSURE, UNSURE, UNSURE)
    assert kept(FLy(theta=-math.inf, window=1), p, [0, 0, 0]) == [False, False, False]


@pytest.mark.parametrize("drafts, window, expected", [
    # an unsure mismatch at 0, then the next drafts: agree (1 = argmax SURE) or disagree (3)
    ([2, 1, 1, 1], 2, [True, False, False, False]),  # drafts 1, 2 agree: kept
    ([2, 3, 1, 1], 2, [False, False, False, False]),  # draft 1 disagrees: rejected at the mismatch
    ([2, 1, 3, 1], 2, [False, False, False, False]),  # the window's last draft disagrees
    ([2, 1, 1, 3], 2, [True, False, False, False]),  # a disagreement past the window does not matter
    ([2, 1, 1, 1], 3, [True, False, False, False]),  # the window ends at the last draft: fits
    ([2, 1, 1, 1], 4, [False, False, False, False]),  # the window runs past the block's end: rejected
])
def test_window_keeps_a_mismatch_only_if_the_next_drafts_agree(drafts, window, expected):
    p = block(UNSURE, SURE, SURE, SURE, SURE)  # 4 drafts and the bonus position
    # theta = 0.5 lies between H(SURE) and H(UNSURE): only the mismatch at 0 passes the gate
    assert kept(FLy(theta=0.5, window=window), p, drafts) == expected


def test_a_mismatch_inside_a_window_breaks_it_and_may_be_kept_itself():
    # mismatches at 0 and 1 (both unsure); drafts 2, 3 agree: 0's window (1) holds a mismatch, 1's (2) agrees
    p = block(UNSURE, UNSURE, SURE, SURE, SURE)
    assert kept(FLy(theta=0.3, window=1), p, [2, 2, 1, 1]) == [False, True, False, False]


def test_mix_keeps_the_drafters_distribution_where_kept_and_the_target_elsewhere_bonus_included():
    p = block(UNSURE, SURE, SURE, SURE)  # 3 drafts and the bonus
    q = block(*[[0.1, 0.1, 0.7, 0.1]] * 4)
    q_s, p_s = q.clone(), p.clone() * 0.5 + 0.125  # sampling distributions differ from q, p
    m = FLy(theta=0.3, window=1).mix(q, p, q_s, p_s, drafts=torch.tensor([[2, 1, 1]]))
    assert m.defer.tolist() == [[False, True, True, True]]
    assert torch.equal(m.emit[0, 0], q_s[0, 0]) and torch.equal(m.emit[0, 1:], p_s[0, 1:])
    assert torch.equal(m.accept, m.emit)


def test_mix_without_drafts_is_refused():
    q = block(UNSURE)
    with pytest.raises(SpeccascadeError, match="reads the block's drafts"):
        FLy().mix(q, q, q, q)


def loop_reference(rule: FLy, p: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """The definition, one position at a time (``r`` over the drafted positions)."""
    out = torch.ones(drafts.shape, dtype=torch.bool)
    for b in range(drafts.shape[0]):
        top1 = [bool(p[b, t, drafts[b, t]] >= p[b, t].max()) for t in range(drafts.shape[1])]
        for t in range(drafts.shape[1]):
            top3 = p[b, t].topk(3).values.tolist()
            entropy = -sum(x * math.log(x) for x in top3 if x > 0)
            window = top1[t + 1 : t + 1 + rule.window]
            fits = len(window) == rule.window
            out[b, t] = not (not top1[t] and entropy > rule.theta and fits and all(window))
    return out


@pytest.mark.parametrize("window", [1, 2, 3])
def test_vectorised_rule_equals_the_loop_over_positions(window):
    g = torch.Generator().manual_seed(window)
    B, gamma, V = 64, 6, 5
    p = (torch.randn(B, gamma + 1, V, generator=g) * 1.5).softmax(-1)
    # drafts agree with the target half of the time, so windows both hold and break
    argmax = p[:, :gamma].argmax(-1)
    drafts = torch.where(torch.rand(B, gamma, generator=g) < 0.6, argmax, torch.randint(0, V, (B, gamma), generator=g))
    rule = FLy(theta=0.8, window=window)
    r = rule.defer(p, drafts)
    assert r[:, gamma].all()  # the bonus position defers
    expected = loop_reference(rule, p, drafts)
    assert torch.equal(r[:, :gamma], expected)
    assert (~expected).any() and expected.any()  # the case is not degenerate


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_knob_defers_everywhere_and_gives_the_target_distribution(seed):
    g = torch.Generator().manual_seed(seed)
    q, p = torch.randn(2, 3, 4, 6, generator=g).softmax(-1)
    q_s, p_s = q ** 2 / (q ** 2).sum(-1, keepdim=True), p ** 2 / (p ** 2).sum(-1, keepdim=True)
    drafts = torch.randint(0, 6, (3, 3), generator=g)
    m = rules.from_name("fly", FLy.EXACT, window=1).mix(q, p, q_s, p_s, drafts=drafts)
    assert m.defer.all() and torch.equal(m.emit, p_s) and torch.equal(m.accept, p_s)
    assert FLy.EXACT > math.log(3)  # above the largest top-3 entropy


def test_offline_comparison_refuses_fly_without_its_block_columns_in_one_line():
    with pytest.raises(SpeccascadeError, match="scores trace rows from their blocks: the columns p_top1") as err:
        offline.candidates({}, "fly:0.3")
    assert "\n" not in str(err.value)


def test_decoder_keeps_exactly_the_mismatches_the_rule_keeps(pair, batch):
    """Greedy decoding with the gate open: a block's decisions are the rule's on the block's p and drafts,
    and the drafts accepted run up to the first deferred mismatch."""
    ids, mask = batch
    rule = FLy(theta=-math.inf, window=1)
    blocks = []
    SpeculativeCascade(pair, rule, block_size=4, temperature=0, hook=blocks.append).generate(ids, mask, max_new_tokens=24)
    kept_mismatches = 0
    for e in blocks:
        gamma = e.drafts.shape[1]
        assert torch.equal(e.deferred, rule.defer(e.p, e.drafts)[:, :gamma])
        top1 = e.p[:, :gamma].gather(-1, e.drafts.unsqueeze(-1)).squeeze(-1) >= e.p[:, :gamma].max(-1).values
        rejected = e.deferred & ~top1  # T = 0: a deferred mismatch is rejected, everything else accepted
        first = torch.where(rejected.any(1), rejected.long().argmax(1), gamma)
        assert torch.equal(e.n_accepted[e.active], first[e.active])
        kept_mismatches += int((~e.deferred & ~top1)[e.active].sum())
    assert kept_mismatches > 0


def test_greedy_blocks_are_never_cut_for_fly(pair, batch):
    """The window reads drafts past the tokens a row still needs, so FLy's blocks stay whole: the
    dynamic cache decodes what the static cache (whole blocks by construction) decodes."""
    ids, mask = batch
    rule = FLy(theta=-math.inf, window=1)
    for new in (6, 9, 11):
        cut = SpeculativeCascade(pair, rule, block_size=4).generate(ids, mask, max_new_tokens=new)
        full = SpeculativeCascade(pair, rule, block_size=4, cache="static").generate(ids, mask, max_new_tokens=new)
        assert torch.equal(cut.sequences, full.sequences) and cut.stats.drafted == full.stats.drafted
