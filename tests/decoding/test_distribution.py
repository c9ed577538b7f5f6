"""algorithms.md section 6, limit 2: with forced defer at T > 0 the emitted tokens follow the target.

A pair over 8 token ids; many rows of one prompt; the joint law of the first two new tokens
(64 cells) is compared with the target's exact law by a chi-square test. The same test run on
two deliberately broken deciders must fail, which shows it has the power to catch them.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from speccascade import SpeculativeCascade, rules
from speccascade.decoding import Sampler, tiny_random_pair
from speccascade.decoding.sampling import sample
from tests.conftest import DEVICE

V, N, GAMMA = 8, 20_000, 3
PROMPT = torch.tensor([[3, 1, 4, 1, 5]], device=DEVICE)


@pytest.fixture(scope="module")
def small_pair():
    return tiny_random_pair(seed=5, vocab_size=V, device=DEVICE)


def target_joint(pair, sampler: Sampler) -> torch.Tensor:
    """Exact P(x1, x2) under the target's sampling distribution, [V, V]."""
    with torch.no_grad():
        first = sampler(pair.target(PROMPT).logits[0, -1].float())
        prefixes = torch.cat([PROMPT.repeat(V, 1), torch.arange(V, device=DEVICE).unsqueeze(1)], dim=1)
        second = sampler(pair.target(prefixes).logits[:, -1].float())
    return (first.unsqueeze(1) * second).cpu()


def empirical_joint(decoder) -> torch.Tensor:
    out = decoder.generate(PROMPT.repeat(N, 1), max_new_tokens=2, seed=list(range(N)))
    x = out.new_tokens
    return torch.bincount(x[:, 0] * V + x[:, 1], minlength=V * V).reshape(V, V).double().cpu()


def chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    keep = expected_probs.flatten() * N >= 5  # pool the rare cells
    obs, exp = observed.flatten(), expected_probs.flatten().double() * N
    obs = torch.cat([obs[keep], obs[~keep].sum(0, keepdim=True)])
    exp = torch.cat([exp[keep], exp[~keep].sum(0, keepdim=True)])
    exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


class NoDivisionByQ(SpeculativeCascade):
    """Broken acceptance: accepts with probability pi(x) instead of min(1, pi(x) / q(x))."""

    def accept(self, state, drafts, q_s, accept, limit):
        x, gamma = drafts.unsqueeze(-1), drafts.shape[1]
        accept_prob = accept[:, :gamma].gather(-1, x).squeeze(-1)
        index = state.out.emitted.unsqueeze(1) + torch.arange(gamma, device=drafts.device)
        accepted = state.streams.accept.gather(1, index) < accept_prob
        return accepted.long().cumprod(1).sum(1), accept_prob


class PlainResidual(SpeculativeCascade):
    """Broken residual: after a rejection draws from pi instead of norm(max(0, pi - q))."""

    def resample(self, state, n, limit, q_s, emit):
        return sample(emit[state.rows, n], state.streams.resample[state.rows, state.out.emitted + n])


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5)], ids=["T=1", "T=0.7,top5"])
@pytest.mark.parametrize("rule", [rules.AlwaysDefer(), rules.FLy(theta=rules.FLy.EXACT, window=1)], ids=repr)
def test_forced_defer_emits_the_target_distribution(small_pair, sampling, rule):
    """Always defer, and FLy at its exact knob (a block rule, which reads the drafts)."""
    dec = SpeculativeCascade(small_pair, rule, block_size=GAMMA, **sampling)
    expected = target_joint(small_pair, dec.sampler)
    observed = empirical_joint(dec)
    assert chi_square_p(observed, expected) > 1e-3


@pytest.mark.parametrize("broken", [NoDivisionByQ, PlainResidual])
def test_the_test_catches_a_broken_decoder(small_pair, broken):
    dec = broken(small_pair, rules.AlwaysDefer(), block_size=GAMMA, temperature=1.0)
    observed = empirical_joint(dec)
    assert chi_square_p(observed, target_joint(small_pair, dec.sampler)) < 1e-6


def test_the_drafter_differs_from_the_target(small_pair):
    """Guard for the power of the test: if q were close to p nothing could be caught."""
    with torch.no_grad():
        q = small_pair.drafter(PROMPT).logits[0, -1].softmax(-1)
        p = small_pair.target(PROMPT).logits[0, -1].softmax(-1)
    assert 0.5 * (p - q).abs().sum() > 0.1
