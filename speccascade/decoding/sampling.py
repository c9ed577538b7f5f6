"""Sampling distributions and seeded, per-row random streams.

Both models' logits go through the same :class:`Sampler`, so temperature, top-k and top-p are
applied identically (docs/algorithms.md section 1). At temperature 0 the sampling distribution is
one-hot on the argmax, so greedy decoding runs through exactly the same accept/resample code.

Randomness is counter-based: row ``b`` draws its ``j``-th output token with uniform
``U[b, j]`` of a stream seeded per row. The drafter's own decoding and the cascade's drafts use
the same stream, so a never-deferring cascade reproduces the drafter token for token, and a row
decodes the same whatever batch it sits in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import SpeccascadeError


@dataclass(frozen=True)
class Sampler:
    """Turns logits into the distribution actually sampled from (``q~``, ``p~``)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SpeccascadeError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SpeccascadeError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise SpeccascadeError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_identity(self) -> bool:
        """True when the sampled distribution is the plain softmax (no second softmax needed)."""
        return self.temperature == 1 and self.top_k is None and self.top_p is None

    def __call__(self, logits: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Sampling distribution for float32 ``logits`` ``[..., V]``; ``probs`` = their softmax, if known."""
        if self.greedy:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        if self.is_identity and probs is not None:
            return probs
        scaled = logits if self.temperature == 1 else logits / self.temperature  # x / 1 is x: no operator
        if self.top_k is not None and self.top_k < scaled.shape[-1]:
            kth = scaled.topk(self.top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            # drop a token when the mass strictly before it already reaches top_p
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scaled = scaled.masked_fill(drop, float("-inf"))
        return scaled.softmax(-1)


def sample(dist: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from (possibly unnormalised) ``dist`` ``[..., V]``, of positive total mass, with uniforms
    ``u`` ``[...]``.

    Returns the first token whose cumulative mass exceeds ``u * total``, which always has positive
    mass; a one-hot ``dist`` returns its hot token whatever ``u`` is.
    """
    cdf = dist.cumsum(-1)
    threshold = ((u if u.dtype == cdf.dtype else u.to(cdf.dtype)) * cdf[..., -1]).unsqueeze(-1)
    token = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    # rounding can put the threshold at the total mass (token = V): fall back to the last token with mass. Past
    # that token the cdf is the total, so a token found is never after it: the smaller of the two is the draw
    last = torch.where(dist > 0, vocabulary(dist.shape[-1], dist.device), -1).amax(-1)
    return torch.minimum(token, last)


@functools.lru_cache(maxsize=8)
def vocabulary(size: int, device: torch.device) -> torch.Tensor:
    """``arange(size)``: the token ids, built once per vocabulary size and device."""
    with torch.inference_mode():
        return torch.arange(size, device=device)


class RandomStreams:
    """Uniforms ``[B, L]`` for the three independent uses of randomness in a decode.

    ``draft``: drafting and every sample from the cascade's own ``pi`` (also the baselines);
    ``accept``: the accept/reject coin per drafted position; ``resample``: the residual draw.
    Row ``b`` is seeded with ``seeds[b]``, so its tokens do not depend on the rest of the batch.
    Drawn when first read: greedy exact decoding never reads them.
    """

    def __init__(self, seeds: Sequence[int], length: int, device: torch.device) -> None:
        self.seeds, self.length, self.device = seeds, length, device

    @functools.cached_property
    def streams(self) -> tuple[torch.Tensor, ...]:
        """The draft, accept and resample streams, each ``[B, L]``."""
        return self._drawn(self.seeds)

    def _drawn(self, seeds: Sequence[int]) -> tuple[torch.Tensor, ...]:
        rows = [torch.rand(3, self.length, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
        return torch.stack(rows, dim=1).to(self.device).unbind(0)

    @property
    def draft(self) -> torch.Tensor:
        return self.streams[0]

    @property
    def accept(self) -> torch.Tensor:
        return self.streams[1]

    @property
    def resample(self) -> torch.Tensor:
        return self.streams[2]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the streams of the batch rows ``rows`` (in that order)."""
        if "streams" in self.__dict__:
            self.streams = tuple(stream[rows] for stream in self.streams)
        self.seeds = [self.seeds[b] for b in rows.tolist()]

    def replace(self, rows: torch.Tensor, seeds: Sequence[int]) -> None:
        """Seed the batch rows ``rows`` with ``seeds`` (new prompts in finished rows' places)."""
        if "streams" in self.__dict__:
            for stream, drawn in zip(self.streams, self._drawn(seeds)):
                stream[rows] = drawn
        self.seeds = list(self.seeds)
        for b, seed in zip(rows.tolist(), seeds):
            self.seeds[b] = seed

    @staticmethod
    def row_seeds(seed: int | Sequence[int], batch_size: int) -> list[int]:
        """An int seeds rows ``seed, seed + 1, ...``; a sequence gives one seed per row."""
        if isinstance(seed, int):
            return [seed + b for b in range(batch_size)]
        seeds = list(seed)
        if len(seeds) != batch_size:
            raise SpeccascadeError(f"got {len(seeds)} seeds for a batch of {batch_size} rows")
        return seeds
