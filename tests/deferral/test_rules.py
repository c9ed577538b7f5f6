"""Fixed deferral rules (algorithms.md sections 1, 3, 4; section 6 limits 4 and 6).

Hand-built cases check each rule's decision, worked out in the comments; random distributions
check the limits: the "exact" knob gives pi = p~, the "drafter only" knob gives pi = q~, and pi
always sums to 1. Decisions are taken on the unscaled q, p; mixing uses q~ (q_s), p~ (p_s).
"""

from __future__ import annotations

import math

import pytest
import torch

from speccascade.decoding import SpeculativeCascade
from speccascade.deferral import features as F
from speccascade.deferral import rules
from speccascade.deferral.heads import DeferralHead
from speccascade.deferral.rules import OPT, TopK, BiLD, Chow, Diff, LossySD, Mix, TokenV1, TokenV2, TokenV3
from speccascade.errors import SpeccascadeError

MIXTURE_RULES = ["chow", "diff", "opt", "bild", "gain", "kl", "js", "entropy", "tokenv1", "tokenv2", "tokenv3", "topk"]
TOKEN_RULES = ["tokenv1", "tokenv2", "tokenv3", "topk"]
B, T, V = 3, 4, 11


def dist(*rows: list[float]) -> torch.Tensor:
    """Hand-built distributions as a [1, len(rows), V] block (one batch row, one position each)."""
    return torch.tensor([list(rows)], dtype=torch.float32)


def random_dists(seed: int = 0, temperature: float = 0.6):
    """Unscaled q, p (softmax of random logits) and sampling q_s, p_s at another temperature."""
    g = torch.Generator().manual_seed(seed)
    lq = 2.0 * torch.randn(B, T, V, generator=g)
    lp = 2.0 * torch.randn(B, T, V, generator=g)
    return lq.softmax(-1), lp.softmax(-1), (lq / temperature).softmax(-1), (lp / temperature).softmax(-1)


def mix(rule: rules.Rule, q, p, q_s=None, p_s=None) -> Mix:
    return rule.mix(q, p, q if q_s is None else q_s, p if p_s is None else p_s)


# ---------------------------------------------------------------------------------------------
# 1. Hand-worked decisions: every rule defers somewhere and keeps somewhere.
# ---------------------------------------------------------------------------------------------

# Shared hand example (V = 4):
#   q = [0.7, 0.1, 0.1, 0.1], p = [0.2, 0.6, 0.1, 0.1]
#   max q = 0.7, max p = 0.6, D_TV = sum max(0, q - p) = 0.5 (only v = 0 contributes 0.7 - 0.2)
Q1, P1 = [0.7, 0.1, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]


@pytest.mark.parametrize(
    "rule, q_rows, p_rows, expected",
    [
        # Chow alpha = 0.2: defer iff max q < 0.8.
        #   position 0: max q = 0.7 < 0.8 -> defer;  position 1: max q = 0.9 -> keep
        (Chow(alpha=0.2), [Q1, [0.9, 0.05, 0.03, 0.02]], [P1, P1], [True, False]),
        # Diff alpha = 0.1: defer iff max q < max p - 0.1.
        #   position 0: 0.7 < 0.6 - 0.1 = 0.5? no -> keep
        #   position 1: p = [0.9, ...]: 0.7 < 0.9 - 0.1 = 0.8 -> defer
        (Diff(alpha=0.1), [Q1, Q1], [P1, [0.9, 0.05, 0.03, 0.02]], [False, True]),
        # OPT alpha = 0.1: defer iff max q < max p - 0.1 * D_TV.
        #   position 0: 0.7 < 0.6 - 0.05 = 0.55? no -> keep
        #   position 1: q = [0.4, 0.3, 0.2, 0.1], p = [0.1, 0.8, 0.05, 0.05]:
        #     D_TV = 0.3 + 0 + 0.15 + 0.05 = 0.5; 0.4 < 0.8 - 0.05 = 0.75 -> defer
        (OPT(alpha=0.1), [Q1, [0.4, 0.3, 0.2, 0.1]], [P1, [0.1, 0.8, 0.05, 0.05]], [False, True]),
        # OPT alpha = -1 on the shared example: 0.7 < 0.6 + 1 * 0.5 = 1.1 -> defer (the sign of alpha matters)
        (OPT(alpha=-1.0), [Q1], [P1], [True]),
        # BiLD alpha = 0.3: defer iff D_TV > 0.3.
        #   position 0: D_TV = 0.5 -> defer
        #   position 1: q = [0.4, 0.3, 0.2, 0.1], p = [0.35, 0.35, 0.2, 0.1]: D_TV = 0.05 -> keep
        (BiLD(alpha=0.3), [Q1, [0.4, 0.3, 0.2, 0.1]], [P1, [0.35, 0.35, 0.2, 0.1]], [True, False]),
    ],
    ids=["chow", "diff", "opt", "opt-negative-alpha", "bild"],
)
def test_position_rule_decisions_by_hand(rule, q_rows, p_rows, expected):
    q, p = dist(*q_rows), dist(*p_rows)
    assert rule.defer(q, p).tolist() == [expected]
    m = mix(rule, q, p)
    assert m.defer.tolist() == [expected]
    # pi = p~ where deferred, q~ where kept (here q~ = q, p~ = p)
    for t, deferred in enumerate(expected):
        assert torch.equal(m.emit[0, t], (p if deferred else q)[0, t])
        assert torch.equal(m.accept[0, t], m.emit[0, t])


@pytest.mark.parametrize(
    "rule, q_rows, p_rows, expected",
    [
        # TokenV1 alpha = 0.1: defer v iff q(v) < max p - 0.1 = 0.5.
        #   position 0: q = [0.7, 0.1, 0.1, 0.1] -> r = [F, T, T, T]
        #   position 1: q = [0.25, 0.25, 0.25, 0.25], p = [0.3, 0.3, 0.2, 0.2]:
        #     threshold 0.3 - 0.1 = 0.2; every q(v) = 0.25 >= 0.2 -> r = [F, F, F, F]
        (TokenV1(alpha=0.1), [Q1, [0.25] * 4], [P1, [0.3, 0.3, 0.2, 0.2]],
         [[False, True, True, True], [False, False, False, False]]),
        # TokenV2 alpha = 0.1: defer v iff p(v) < max p - 0.1.
        #   position 0: threshold 0.5; p = [0.2, 0.6, 0.1, 0.1] -> r = [T, F, T, T]
        #   position 1: p = [0.3, 0.4, 0.2, 0.1]: threshold 0.4 - 0.1 = 0.3; p(v) < 0.3 -> r = [F, F, T, T]
        (TokenV2(alpha=0.1), [Q1, Q1], [P1, [0.3, 0.4, 0.2, 0.1]],
         [[True, False, True, True], [False, False, True, True]]),
        # TokenV2 alpha = 0.35, p = [0.3, 0.4, 0.2, 0.1]: threshold 0.05, every p(v) >= 0.1 -> keep all
        (TokenV2(alpha=0.35), [Q1], [[0.3, 0.4, 0.2, 0.1]], [[False, False, False, False]]),
        # TokenV3 alpha = 0.5: defer v iff p(v) < 0.5 * max p = 0.3.
        #   position 0: p = [0.2, 0.6, 0.1, 0.1] -> r = [T, F, T, T]
        #   position 1: p = [0.3, 0.3, 0.2, 0.2]: threshold 0.15, every p(v) >= 0.2 -> r = [F, F, F, F]
        (TokenV3(alpha=0.5), [Q1, Q1], [P1, [0.3, 0.3, 0.2, 0.2]],
         [[True, False, True, True], [False, False, False, False]]),
        # TokenV3 alpha = 0.8 on p = [0.2, 0.6, 0.1, 0.1]: threshold 0.2 * 0.6 = 0.12 -> r = [F, F, T, T]
        (TokenV3(alpha=0.8), [Q1], [P1], [[False, False, True, True]]),
        # TopK k = 2: defer v iff at least 2 tokens of p are strictly more likely than v.
        #   position 0: p = [0.2, 0.6, 0.1, 0.1], strict ranks [1, 0, 2, 2] -> r = [F, F, T, T]
        #   position 1: p = [0.4, 0.3, 0.3, 0.0], ranks [0, 1, 1, 3]: the tie at 0.3 is kept -> r = [F, F, F, T]
        (TopK(k=2), [Q1, Q1], [P1, [0.4, 0.3, 0.3, 0.0]],
         [[False, False, True, True], [False, False, False, True]]),
        # TopK k = 4 = V: nothing has rank >= 4 -> keep all
        (TopK(k=4), [Q1], [P1], [[False, False, False, False]]),
    ],
    ids=["tokenv1", "tokenv2", "tokenv2-keep-all", "tokenv3", "tokenv3-alpha0.8", "topk", "topk-k=V"],
)
def test_token_rule_decisions_by_hand(rule, q_rows, p_rows, expected):
    q, p = dist(*q_rows), dist(*p_rows)
    assert rule.defer_tokens(q, p).tolist() == [expected]
    m = mix(rule, q, p)
    assert m.defer.tolist() == [expected]
    for t, r in enumerate(expected):
        if not any(r):  # nothing deferred: eta = 0, pi = q~ exactly
            assert torch.equal(m.emit[0, t], q[0, t])


def test_token_mixture_formula_by_hand():
    # TokenV1 alpha = 0.1 on q~ = q = [0.7, 0.1, 0.1, 0.1], p~ = p = [0.2, 0.6, 0.1, 0.1]:
    #   r = [F, T, T, T], eta = sum_u r(u) q~(u) = 0.3
    #   pi = q~ (1 - r) + p~ eta = [0.7, 0, 0, 0] + 0.3 * [0.2, 0.6, 0.1, 0.1] = [0.76, 0.18, 0.03, 0.03]
    q, p = dist(Q1), dist(P1)
    m = mix(TokenV1(alpha=0.1), q, p)
    torch.testing.assert_close(m.emit, dist([0.76, 0.18, 0.03, 0.03]))
    torch.testing.assert_close(m.accept, m.emit)
    # with different sampling distributions: q~ = [0.5, 0.2, 0.2, 0.1], p~ = [0.1, 0.7, 0.1, 0.1]
    #   r is still [F, T, T, T] (decided on q, p); eta = 0.2 + 0.2 + 0.1 = 0.5
    #   pi = [0.5, 0, 0, 0] + 0.5 * [0.1, 0.7, 0.1, 0.1] = [0.55, 0.35, 0.05, 0.05]
    m = mix(TokenV1(alpha=0.1), q, p, dist([0.5, 0.2, 0.2, 0.1]), dist([0.1, 0.7, 0.1, 0.1]))
    assert m.defer.tolist() == [[[False, True, True, True]]]
    torch.testing.assert_close(m.emit, dist([0.55, 0.35, 0.05, 0.05]))


def test_decisions_use_unscaled_q_and_mixing_uses_sampling_distributions():
    # Chow alpha = 0.2 defers iff max q < 0.8. Unscaled q = [0.7, 0.1, 0.1, 0.1] -> defer.
    # At T = 0.5, q~ ∝ q^2 = [0.49, 0.01, 0.01, 0.01] / 0.52 -> max q~ ≈ 0.94, which would keep:
    # the rule must decide on q, and then emit p~ (not p).
    q, p = dist(Q1), dist(P1)
    q_s, p_s = (q ** 2) / (q ** 2).sum(-1, keepdim=True), (p ** 2) / (p ** 2).sum(-1, keepdim=True)
    m = Chow(alpha=0.2).mix(q, p, q_s, p_s)
    assert m.defer.tolist() == [[True]]
    assert torch.equal(m.emit, p_s)
    assert not Chow(alpha=0.2).defer(q_s, p_s).any()  # deciding on q~ would have kept


# ---------------------------------------------------------------------------------------------
# 2. Limits: exact speculative decoding at EXACT, drafter only at DRAFTER_ONLY.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MIXTURE_RULES + ["lossy"])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_knob_gives_target_distribution(name, seed):
    cls = rules.FIXED_RULES[name]
    rule = rules.from_name(name, cls.EXACT)
    assert getattr(rule, cls.knob) == cls.EXACT
    q, p, q_s, p_s = random_dists(seed)
    m = rule.mix(q, p, q_s, p_s)
    assert m.defer.all()  # every position (every token) deferred
    if name in TOKEN_RULES:  # pi = p~ * eta with eta = sum q~ = 1 up to rounding
        torch.testing.assert_close(m.emit, p_s, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.accept, p_s, rtol=0, atol=1e-6)
    else:
        assert torch.equal(m.emit, p_s)
        assert torch.equal(m.accept, p_s)


def drafter_only(name: str) -> rules.Rule:
    cls = rules.FIXED_RULES[name]
    return rules.from_name(name, V if cls.DRAFTER_ONLY is None else cls.DRAFTER_ONLY)


@pytest.mark.parametrize("name", MIXTURE_RULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_drafter_only_knob_accepts_every_draft(name, seed):
    rule = drafter_only(name)
    q, p, q_s, p_s = random_dists(seed)
    q_s = q_s.clone()
    q_s[0, 0] = torch.tensor([0.5, 0.5] + [0.0] * (V - 2))  # some q~(x) = 0 entries
    m = rule.mix(q, p, q_s, p_s)
    assert not m.defer.any()
    assert torch.equal(m.emit, q_s)
    assert torch.equal(m.accept, q_s)
    support = q_s > 0
    ratio = m.accept[support] / q_s[support]
    assert torch.equal(ratio, torch.ones_like(ratio))  # acceptance min(1, pi(x) / q~(x)) = 1


def test_topk_has_no_fixed_drafter_only_value():
    assert TopK.DRAFTER_ONLY is None and TopK.knob == "k" and TopK.EXACT == 0
    assert rules.from_name("topk", V) == TopK(k=V)


# ---------------------------------------------------------------------------------------------
# 3. pi is a distribution for every rule and knob, with q~, p~ different from q, p.
# ---------------------------------------------------------------------------------------------

# knobs chosen so that each rule mixes deferred and kept positions / tokens on these distributions
MID_KNOBS = {
    "chow": [0.3, 0.6], "diff": [-0.2, 0.1], "opt": [-0.1, 0.5], "bild": [0.5, 0.7],
    "gain": [0.3, 0.5], "kl": [2.0, 3.0], "js": [0.3, 0.5], "entropy": [1.0, 1.5],
    "tokenv1": [0.0, 0.2], "tokenv2": [0.1, 0.3], "tokenv3": [0.5, 0.9], "topk": [1, 3],
}


def reference_defer(name: str, knob: float, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The table of algorithms.md section 4, written independently of the features module."""
    q1, p1 = q.max(-1).values, p.max(-1).values
    tv = 0.5 * (p - q).abs().sum(-1)
    m = (p + q) / 2
    a = knob
    return {
        "chow": lambda: q1 < 1 - a,
        "diff": lambda: q1 < p1 - a,
        "opt": lambda: q1 < p1 - a * tv,
        "bild": lambda: tv > a,
        "gain": lambda: (p * (p - q)).sum(-1) > a,
        "kl": lambda: (p1 > 0.9) | ((p * (p / q).log()).sum(-1) > a),  # strict above tau = 0.9 (the default)
        "js": lambda: 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1) > a,
        "entropy": lambda: -(q * q.log()).sum(-1) > a,
        "tokenv1": lambda: q < p1[..., None] - a,
        "tokenv2": lambda: p < p1[..., None] - a,
        "tokenv3": lambda: p < (1 - a) * p1[..., None],
        "topk": lambda: (p[..., None, :] > p[..., :, None]).sum(-1) >= a,
    }[name]()


@pytest.mark.parametrize("name, knob", [(n, k) for n, ks in MID_KNOBS.items() for k in ks])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_pi_is_a_distribution_and_follows_the_formula(name, knob, temperature):
    q, p, q_s, p_s = random_dists(seed=3, temperature=temperature)
    rule = rules.from_name(name, knob)
    m = rule.mix(q, p, q_s, p_s)
    r = reference_defer(name, knob, q, p)
    assert torch.equal(m.defer, r)
    assert r.any() and not r.all()  # the case is not degenerate
    if name in TOKEN_RULES:
        eta = (r * q_s).sum(-1, keepdim=True)
        expected = q_s * (~r) + p_s * eta
    else:
        expected = torch.where(r[..., None], p_s, q_s)
        # rejection probability sum max(0, q~ - pi) = r * D_TV(p~, q~) (section 3)
        reject = (q_s - m.emit).clamp_min(0).sum(-1)
        torch.testing.assert_close(reject, r * F.tv_distance(p_s, q_s))
    torch.testing.assert_close(m.emit, expected)
    assert torch.equal(m.accept, m.emit)
    assert (m.emit >= 0).all()
    torch.testing.assert_close(m.emit.sum(-1), torch.ones(B, T), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", MIXTURE_RULES + ["lossy", "always", "never"])
def test_pi_sums_to_one_at_default_knobs(name):
    q, p, q_s, p_s = random_dists(seed=5, temperature=1.7)
    m = rules.from_name(name).mix(q, p, q_s, p_s)
    torch.testing.assert_close(m.emit.sum(-1), torch.ones(B, T), rtol=0, atol=1e-6)
    if name != "lossy":  # LossySD's accept is a scaled ratio, not a distribution
        torch.testing.assert_close(m.accept.sum(-1), torch.ones(B, T), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. Total-variation distance.
# ---------------------------------------------------------------------------------------------


def test_tv_distance_range_and_formula():
    q, p, q_s, p_s = random_dists(seed=7)
    tv = F.tv_distance(p, q)
    assert tv.shape == (B, T)
    assert ((tv >= 0) & (tv <= 1)).all()
    torch.testing.assert_close(tv, 0.5 * (p - q).abs().sum(-1))
    torch.testing.assert_close(F.tv_distance(q, p), tv)  # symmetric
    eye = torch.eye(V)
    assert torch.equal(F.tv_distance(eye[:-1], eye[1:]), torch.ones(V - 1))  # disjoint one-hots: 1
    assert torch.equal(F.tv_distance(q, q), torch.zeros(B, T))  # identical: 0
    assert F.tv_distance(dist(P1), dist(Q1)).item() == pytest.approx(0.5)  # the shared hand example


# ---------------------------------------------------------------------------------------------
# 5. Lossy speculative decoding.
# ---------------------------------------------------------------------------------------------


def test_lossy_alpha_zero_is_speculative_decoding():
    q, p, q_s, p_s = random_dists(seed=2)
    m = LossySD(alpha=0.0).mix(q, p, q_s, p_s)
    assert torch.equal(m.accept, p_s) and torch.equal(m.emit, p_s)
    assert m.defer.shape == (B, T) and m.defer.all()


def test_lossy_acceptance_and_residual():
    # accept x with min(1, p~(x) / ((1 - alpha) q~(x))); residual norm(max(0, p~ - q~)), bonus from p~
    q, p, q_s, p_s = random_dists(seed=2)
    m = LossySD(alpha=0.5).mix(q, p, q_s, p_s)
    torch.testing.assert_close(m.accept, 2.0 * p_s)
    assert torch.equal(m.emit, p_s)  # the decoder's residual norm(max(0, emit - q~)) is then norm(max(0, p~ - q~))
    doc = " ".join(LossySD.__doc__.split())
    assert "norm(max(0, p~ - q~))" in doc and "p~(x) / ((1 - alpha) q~(x))" in doc
    # hand case: p~ = [0.2, 0.6, 0.1, 0.1], q~ = [0.7, 0.1, 0.1, 0.1], alpha = 0.5
    #   acceptance min(1, p~/(0.5 q~)) = [0.571.., 1, 1, 1]
    h = LossySD(alpha=0.5).mix(dist(Q1), dist(P1), dist(Q1), dist(P1))
    accept_prob = (h.accept / dist(Q1)).clamp_max(1.0)
    torch.testing.assert_close(accept_prob, dist([0.4 / 0.7, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("alpha", [-0.1, 1.1])
def test_lossy_alpha_outside_unit_interval_raises(alpha):
    with pytest.raises(SpeccascadeError, match="alpha"):
        LossySD(alpha=alpha)
    with pytest.raises(SpeccascadeError):
        rules.from_name("lossy", alpha)


# ---------------------------------------------------------------------------------------------
# 7. deferred_at; 8. bad names and knobs.
# ---------------------------------------------------------------------------------------------


def test_deferred_at_token_rule_gathers_r_at_the_drafts():
    # TopK k = 2 on p = [0.2, 0.6, 0.1, 0.1]: r = [F, F, T, T] at both positions
    q, p = dist(Q1, Q1), dist(P1, P1)
    m = mix(TopK(k=2), q, p)
    tokens = torch.tensor([[0, 3]])
    assert rules.Rule.deferred_at(m.defer, tokens).tolist() == [[False, True]]
    assert TopK.deferred_at(m.defer, torch.tensor([[2, 1]])).tolist() == [[True, False]]


def test_deferred_at_position_rule_is_identity():
    # Chow alpha = 0.2: max q = 0.7 -> defer, max q = 0.9 -> keep
    m = mix(Chow(alpha=0.2), dist(Q1, [0.9, 0.05, 0.03, 0.02]), dist(P1, P1))
    out = Chow.deferred_at(m.defer, torch.tensor([[3, 0]]))
    assert out.tolist() == [[True, False]]
    assert torch.equal(out, m.defer)


def test_unknown_rule_names_the_known_ones():
    with pytest.raises(SpeccascadeError) as err:
        rules.from_name("nope")
    message = str(err.value)
    assert "nope" in message
    for name in MIXTURE_RULES + ["lossy", "always", "never"]:
        assert name in message


def test_topk_negative_k_raises():
    with pytest.raises(SpeccascadeError, match="k >= 0"):
        TopK(k=-1)
    with pytest.raises(SpeccascadeError):
        rules.from_name("topk", -1)


# ---------------------------------------------------------------------------------------------
# 9. Training-free baselines by hand; one parser for rule strings.
# ---------------------------------------------------------------------------------------------


def test_training_free_baselines_by_hand():
    # q = [0.7, 0.1, 0.1, 0.1], p = [0.2, 0.6, 0.1, 0.1]
    #   gain = sum p (p - q) = 0.2 * -0.5 + 0.6 * 0.5 + 0 + 0 = 0.2
    #   KL(p || q) = 0.2 log(0.2/0.7) + 0.6 log(6) = 0.8245; max p = 0.6
    #   H(q) = -(0.7 log 0.7 + 3 * 0.1 log 0.1) = 0.9404
    q, p = dist(Q1), dist(P1)
    assert rules.Gain(alpha=0.15).defer(q, p).item() and not rules.Gain(alpha=0.25).defer(q, p).item()
    assert rules.KLJudge(alpha=0.8, tau=0.9).defer(q, p).item()
    assert not rules.KLJudge(alpha=0.85, tau=0.9).defer(q, p).item()
    assert rules.KLJudge(alpha=0.85, tau=0.5).defer(q, p).item()  # strict: max p = 0.6 > tau
    assert not rules.KLJudge(alpha=rules.KLJudge.DRAFTER_ONLY, tau=0.5).defer(q, p).item()  # inf keeps every draft
    assert rules.Entropy(alpha=0.9).defer(q, None).item() and not rules.Entropy(alpha=0.95).defer(q, None).item()
    # JS: m = [0.45, 0.35, 0.1, 0.1]; 0.5 [0.2 log(0.2/0.45) + 0.6 log(0.6/0.35)] + 0.5 [0.7 log(0.7/0.45) + 0.1 log(0.1/0.35)]
    js = 0.5 * (0.2 * math.log(0.2 / 0.45) + 0.6 * math.log(0.6 / 0.35)) + 0.5 * (0.7 * math.log(0.7 / 0.45) + 0.1 * math.log(0.1 / 0.35))
    assert rules.JS(alpha=js - 1e-4).defer(q, p).item() and not rules.JS(alpha=js + 1e-4).defer(q, p).item()


@pytest.mark.parametrize("spec, expected", [
    ("opt:0.3", OPT(alpha=0.3)), ("topk:5", TopK(k=5)), ("kl:0.2:tau=0.8", rules.KLJudge(alpha=0.2, tau=0.8)),
    ("kl:tau=0.8", rules.KLJudge(tau=0.8)), ("js", rules.JS()), (" chow:-inf ", Chow(alpha=float("-inf"))),
    ("kl:0.1789148449897766:tau=0.9", rules.KLJudge(alpha=0.1789148449897766, tau=0.9)),
    ("fly:1.0867239236831665:window=2", rules.FLy(theta=1.0867239236831665, window=2)),
])
def test_parse_reads_every_spelling(spec, expected):
    rule = rules.parse(spec).build()
    assert rule == expected
    assert rules.parse(rule.spec).build() == rule  # the spelling round-trips, every digit of a knob read off data


def test_parse_returns_the_spec_it_read_and_loads_nothing(tmp_path):
    assert rules.parse(" KL:0.2:tau=0.8 ") == rules.Spec("kl", 0.2, (("tau", 0.8),))
    assert rules.parse("kl:tau=0.8") == rules.Spec("kl", None, (("tau", 0.8),))
    assert rules.parse("always") == rules.Spec("always")
    head = tmp_path / "no-head-here"  # parsed, not loaded: the directory is read by build()
    assert rules.parse(f"learned:{head}@0.25") == rules.Spec("learned", 0.25, head=str(head))
    knob = 1.915742177516222e-05  # a threshold read off validation labels: every digit is kept
    learned = rules.Learned(DeferralHead(["q_top1"], hidden=4, depth=1, provenance={"path": str(head)}), threshold=knob)
    assert rules.parse(learned.spec) == rules.Spec("learned", knob, head=str(head))
    assert rules.parse("seq:0.4", {"seq": Chow}) == rules.Spec("seq", 0.4)  # a command's own name, with Chow's knob
    with pytest.raises(SpeccascadeError, match="is not a deferral head"):
        rules.parse(f"learned:{head}").build()


@pytest.mark.parametrize("spec, message", [
    ("opt:abc", "'abc' is not a number"), ("chow:nan", "not NaN"), ("always:0.3", "'always' takes no knob"),
    ("never:abc", "'never' takes no knob"),
    ("topk:2.5", "whole number"), ("kl:0.1:beta=2", "no setting 'beta'"), ("kl:0.1:tau", "is not PARAM=VALUE"),
    ("", "empty rule"), ("learned:", "names no head directory"), ("bogus:1", "unknown rule 'bogus'"),
    ("kl:0.1:tau=2", "tau in \\[0, 1\\]"), ("lossy:1.5", "alpha in \\[0, 1\\]"),
    ("topk:inf", "whole number k, got inf"), ("topk:-inf", "whole number"), ("topk:-1", "k >= 0"),
    ("kl:0.1:tau=inf", "tau in \\[0, 1\\]"), ("lossy:-inf", "alpha in \\[0, 1\\]"),
])
def test_parse_refuses_malformed_rules_in_one_message(spec, message):
    with pytest.raises(SpeccascadeError, match=message):
        rules.parse(spec)


@pytest.mark.parametrize("spec, message", [
    ("drafter:xyz", "rule 'drafter' takes no knob"), ("drafter:tau=1", "rule 'drafter' takes no knob"),
    ("seq:abc", "'abc' is not a number"), ("seq:0.1:tau=1", "no setting 'tau'"), ("nope", "known: drafter, seq, chow"),
])
def test_a_commands_own_names_take_the_knob_they_are_given(spec, message):
    with pytest.raises(SpeccascadeError, match=message):
        rules.parse(spec, {"drafter": None, "seq": Chow})


def test_learned_threshold_must_be_a_number(tmp_path):
    with pytest.raises(SpeccascadeError, match="'x' is not a number"):
        rules.parse(f"learned:{tmp_path}@x")


@pytest.mark.parametrize("offset", [-1, 1])
def test_a_head_on_another_vocabulary_is_one_error_in_a_decoder_built_by_hand(pair, batch, offset):
    """A Python caller that builds the decoder itself skips check_head; Learned.mix refuses a head embedding token ids
    of another vocabulary size in one error naming both (without it, a larger vocabulary would decode silently)."""
    scalars = len(F.POSITION_FEATURES)
    head = DeferralHead([*F.POSITION_FEATURES, "draft_token"], mean=[0.0] * scalars, std=[1.0] * scalars,
                        vocab_size=pair.vocab_size + offset)
    decoder = SpeculativeCascade(pair, rules.Learned(head), block_size=3)
    with pytest.raises(SpeccascadeError, match=rf"^head \? embeds token ids of a vocabulary of {pair.vocab_size + offset} "
                                               rf"tokens; the pair scores {pair.vocab_size}$"):
        decoder.generate(*batch, max_new_tokens=4)
