"""The inverse-CDF draw: the first token whose cumulative mass exceeds ``u * total``, over any leading shape."""

from __future__ import annotations

import torch

from speccascade.decoding.sampling import sample


def drawn_by_definition(dist: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row by row in Python: the first token whose cumulative mass exceeds ``u * total``, else the last with mass."""
    tokens = []
    for row, v in zip(dist.tolist(), u.tolist()):
        cdf = torch.tensor(row).cumsum(0).tolist()
        hit = [i for i, c in enumerate(cdf) if c > v * cdf[-1]]
        tokens.append(hit[0] if hit else max(i for i, m in enumerate(row) if m > 0))
    return torch.tensor(tokens)


def test_a_draw_is_the_first_token_past_the_threshold_or_the_last_with_mass():
    gen = torch.Generator().manual_seed(0)
    dist = torch.rand(64, 12, generator=gen) * (torch.rand(64, 12, generator=gen) < 0.5)  # many zero-mass tokens
    dist[:, 0] += 1e-3  # every row has mass
    u = torch.rand(64, generator=gen)
    u[:8] = 1.0  # the threshold at the total mass: the last token with mass, never one past it
    drawn = sample(dist, u)
    assert torch.equal(drawn, drawn_by_definition(dist, u))
    assert bool((dist.gather(1, drawn.unsqueeze(1)) > 0).all())
    assert len(set(drawn[:8].tolist())) > 1  # the fallback rows end at different tokens


def test_a_draw_over_leading_dimensions_is_the_draw_of_each_row():
    gen = torch.Generator().manual_seed(1)
    dist, u = torch.rand(5, 1, 20, generator=gen).softmax(-1), torch.rand(5, 1, generator=gen)
    assert torch.equal(sample(dist, u), sample(dist[:, 0], u[:, 0]).unsqueeze(1))
    one_hot = torch.zeros(5, 20).scatter_(1, torch.arange(5).unsqueeze(1) * 3, 1.0)
    assert sample(one_hot, u[:, 0]).tolist() == [0, 3, 6, 9, 12]  # a one-hot draw is its hot token
