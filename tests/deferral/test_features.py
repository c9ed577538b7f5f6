"""The feature spec on hand-built distributions equals its formulas."""

from __future__ import annotations

import math

import pytest
import torch

from speccascade.deferral import features as F

Q = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
P = torch.tensor([[0.1, 0.6, 0.2, 0.1]])


def test_position_features_by_hand():
    f = F.position_features(Q, P, rel_position=0.4)
    assert list(f) == list(F.POSITION_FEATURES)
    expect = {
        "q_top1": 0.5, "q_top2": 0.3, "q_top3": 0.2, "q_margin": 0.2,
        "p_top1": 0.6, "p_top2": 0.2, "p_top3": 0.1, "p_margin": 0.4,
        "q_entropy": -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)),
        "p_entropy": -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
        "tv": 0.4,  # sum max(0, q - p) = 0.4 + 0 + 0 + 0
        "kl_qp": 0.5 * math.log(5) + 0.3 * math.log(0.5),
        "kl_pq": 0.1 * math.log(0.2) + 0.6 * math.log(2) + 0.1 * (math.log(0.1) - math.log(F.EPS)),
        "js": 0.5 * sum(a * math.log(a / ((a + b) / 2)) + b * math.log(b / ((a + b) / 2))
                        for a, b in zip(Q[0].tolist(), P[0].tolist()) if a > 0) + 0.5 * 0.1 * math.log(2),
        "q_sq": 0.25 + 0.09 + 0.04, "p_sq": 0.01 + 0.36 + 0.04 + 0.01, "pq_dot": 0.05 + 0.18 + 0.04,
        "p_at_q_argmax": 0.1, "q_at_p_argmax": 0.3,  # argmax q = 0, argmax p = 1
        "argmax_agree": 0.0,
        "rel_position": 0.4,
    }
    for name, value in expect.items():
        assert f[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_token_features_by_hand():
    f = F.token_features(Q, P, torch.tensor([2]))
    assert f["q_tok"].item() == pytest.approx(0.2) and f["p_tok"].item() == pytest.approx(0.2)
    assert f["log_ratio"].item() == pytest.approx(0.0, abs=1e-6)
    assert f["q_rank"].item() == 2 and f["p_rank"].item() == 1  # 0.5, 0.3 > 0.2 under q; 0.6 > 0.2 under p
    g = F.token_features(Q, P, torch.tensor([3]))
    assert g["log_ratio"].item() == pytest.approx(math.log(0.1) - math.log(F.EPS), rel=1e-5)  # q(v) = 0 clamped


def test_vocabulary_features_match_per_token_features():
    torch.manual_seed(0)
    q, p = torch.rand(2, 3, 7).softmax(-1), torch.rand(2, 3, 7).softmax(-1)
    q[0, 0, 1] = q[0, 0, 2]  # a tie: both share the smaller rank
    full = F.vocabulary_token_features(q, p, F.TOKEN_FEATURES)
    for v in range(7):
        one = F.token_features(q, p, torch.full((2, 3), v))
        for name in F.TOKEN_FEATURES:
            torch.testing.assert_close(full[name][..., v], one[name])


def test_only_requested_features_are_computed():
    f = F.position_features(Q, None, names=("q_top1", "q_entropy"))
    assert set(f) == {"q_top1", "q_entropy"}
    assert set(F.DRAFTER_ONLY_FEATURES) <= set(F.POSITION_FEATURES)
    assert all(not n.startswith("p_") and n not in ("tv", "kl_pq", "kl_qp") for n in F.DRAFTER_ONLY_FEATURES)
    drafter_only = F.position_features(Q, None, names=F.DRAFTER_ONLY_FEATURES)  # computable without p
    assert set(drafter_only) == set(F.DRAFTER_ONLY_FEATURES)


def test_js_divergence_bounds_and_symmetry():
    torch.manual_seed(1)
    q, p = torch.rand(5, 9).softmax(-1), torch.rand(5, 9).softmax(-1)
    torch.testing.assert_close(F.js_divergence(p, q), F.js_divergence(q, p))
    assert torch.all(F.js_divergence(p, p) < 1e-6)
    disjoint = F.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert disjoint.item() == pytest.approx(math.log(2))


def test_spec_is_versioned():
    s = F.spec()
    assert s["name"] == F.SPEC_NAME and s["version"] == F.SPEC_VERSION
    assert s["position"] == list(F.POSITION_FEATURES) and s["token"] == list(F.TOKEN_FEATURES)
