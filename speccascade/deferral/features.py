"""The single definition of every quantity computed from the two models' distributions.

Rules, the decoder, trace logging and training all call these functions, so a feature is never
computed two ways. Inputs are probability tensors of shape ``[..., V]`` (last axis: vocabulary).
"""

from __future__ import annotations

import torch

EPS = 1e-10  # algorithms.md section 1: clamp denominators at 1e-10, never take log(0)


def max_prob(probs: torch.Tensor) -> torch.Tensor:
    """Largest probability of each distribution, ``[...]``."""
    return probs.amax(dim=-1)


def tv_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total-variation distance ``D_TV(p, q) = sum_v max(0, q(v) - p(v))``, in [0, 1]."""
    return (q - p).clamp_min(0).sum(dim=-1).clamp(0.0, 1.0)
