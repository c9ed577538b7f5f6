"""Small helpers shared by tests."""

from __future__ import annotations

import torch


def row(ids: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Row ``b``'s real prompt tokens, unpadded, as a [1, n] batch."""
    return ids[b][mask[b].bool()].unsqueeze(0)
