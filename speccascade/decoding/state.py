"""What changes while a batch decodes: the slot layout of the KV caches, and the output.

The decoder's words, defined once:

- **slot**: one column of the KV caches. Every row of a batch and every cache share one slot
  layout, so slot ``j`` is the same column everywhere; ``Slots.tokens``/``positions`` say which
  token and position id sit there, ``Slots.mask`` whether it is one of the row's real tokens.
- **hole**: a slot that holds no real token of a row (its left padding, or a draft that row
  rejected while another row kept its own). Holes are masked out of attention, never zero-filled,
  and every row carries its own position ids, so they change nothing.
- **length**: slots in use, the same for every row. A 0-dim tensor that lives where the caches keep
  their own length: on the device for the static cache (no step waits for the host), on the host
  for the dynamic one (whose crop takes a host count).
- **pending token**: a row's last emitted token. No cache holds it yet: the next step feeds it
  first. ``pos`` is its position id, which is also the number of real tokens cached before it.
- **behind** (lag): how many slots at the end of the layout a cache still lacks. ``catch_up``
  re-feeds them in front of the cache's next input. Every cache starts behind by the prompt (so the
  prompt goes into each model's first step), the target falls behind in the sequential cascade on
  tokens it did not decide, and the drafter lags one slot after a block whose ``q_{gamma+1}``
  nothing read (``drafter_lag``: it skipped that step).
- **window**: the attention mask of a forward: each row's real slots plus the ``n`` new slots it
  fills.
- **advance**: record the slots a step fed (the pending token first; row ``b``'s first ``valid[b]``
  are its tokens, the rest holes) and make the next token pending.
- **rollback**: drop from every cache the newest slots that no row kept.
- **compact**: move each row's real slots together at the right end and drop the slots no row
  uses (T5 reads slot distances as positions; the static cache reuses the space).
- **emit**: append a step's tokens to each row's output; a row is **done** at its first
  end-of-sequence token or at ``max_new_tokens``; ``emitted`` counts a row's new tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import SpeccascadeError
from .cache import KVCache
from .sampling import RandomStreams
from .stats import Counters, DecodeStats


@dataclass
class GenerateOutput:
    """``sequences``: prompt (left-padded) + new tokens, right-padded after EOS; plus the stats."""

    sequences: torch.Tensor
    stats: DecodeStats
    prompt_length: int

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


@dataclass
class Slots:
    """The slot layout every KV cache of a batch shares, and the caches laid out in it."""

    caches: dict[str, KVCache]
    mask: torch.Tensor  # [B, capacity] bool: slots holding a real token of the row
    tokens: torch.Tensor  # [B, capacity] the token id in each slot
    positions: torch.Tensor  # [B, capacity] its position id
    length: torch.Tensor  # 0-dim: slots in use (on the device for the static cache, on the host for the dynamic one)
    pending: torch.Tensor  # [B] each row's pending token
    pos: torch.Tensor  # [B] its position id
    behind: dict[str, int]  # slots at the end each cache still lacks
    contiguous: bool = False  # compact after every step (models whose attention reads slot distances)
    bound: int = 0  # host-side upper bound on ``length``: overflow is checked without a sync

    @classmethod
    def for_prompts(
        cls, ids: torch.Tensor, mask: torch.Tensor, caches: dict[str, KVCache], capacity: int, pad_token_id: int,
        length_device: torch.device | str, contiguous: bool = False,
    ) -> Slots:
        """Lay out left-padded prompts: every token but the last in the slots (no cache holds them yet:
        each cache starts behind by all of them), the last one pending."""
        batch, width = ids.shape
        context = mask[:, :-1].bool()
        slots = torch.zeros(batch, capacity, dtype=torch.bool, device=ids.device)
        slots[:, : width - 1] = context
        tokens = torch.full((batch, capacity), pad_token_id, dtype=torch.long, device=ids.device)
        tokens[:, : width - 1] = ids[:, :-1]
        positions = torch.zeros_like(tokens)
        positions[:, : width - 1] = (context.cumsum(1) - 1).clamp_min(0)
        return cls(caches, slots, tokens, positions, torch.tensor(width - 1, device=length_device),
                   pending=ids[:, -1].clone(), pos=mask.sum(1) - 1, behind={name: width - 1 for name in caches},
                   contiguous=contiguous, bound=width - 1)

    def window(self, n: int) -> torch.Tensor:
        """Attention mask ``[B, capacity]`` over the used slots plus ``n`` new ones that each row fills."""
        slot = torch.arange(self.mask.shape[1], device=self.mask.device)
        return self.mask | ((slot >= self.length) & (slot < self.length + n))

    def catch_up(self, name: str, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids``/``positions`` ``[B, n]`` for cache ``name``, preceded by the slots it lacks; it lacks none after."""
        k = self.behind.get(name, 0)
        if k == 0:
            return ids, positions
        self.behind[name] = 0
        index = (self.length - k + torch.arange(k, device=ids.device)).expand(ids.shape[0], k)
        return torch.cat([self.tokens.gather(1, index), ids], 1), torch.cat([self.positions.gather(1, index), positions], 1)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more slots, compacting the caches when the buffer would overflow."""
        if self.bound + n > self.mask.shape[1]:
            self.compact()
            if self.bound + n > self.mask.shape[1]:
                raise SpeccascadeError(f"the KV cache of {self.mask.shape[1]} slots cannot hold {n} more")
        self.bound += n

    def rollback(self, fed: int, valid: torch.Tensor) -> torch.Tensor:
        """Of the ``fed`` slots a step added, keep the ``kept = max_b valid[b]`` that some row still uses: every
        cache drops the rest. Returns ``kept`` where ``length`` lives (for the dynamic cache, moving it to the
        host is the step's one wait for the device)."""
        kept = valid.max().to(self.length.device)
        for cache in self.caches.values():
            cache.rollback(fed - kept)
        return kept

    def advance(self, fed: torch.Tensor, valid: torch.Tensor, kept: int | torch.Tensor, next_token: torch.Tensor) -> None:
        """Record ``kept`` new slots holding ``fed`` ``[B, n]`` (the pending token first; row ``b``'s first
        ``valid[b]`` are its tokens, the rest holes), and make ``next_token`` pending where ``valid > 0``."""
        slot = torch.arange(self.mask.shape[1], device=valid.device)
        self.mask |= (slot >= self.length) & (slot < self.length + valid.unsqueeze(1))
        offsets = torch.arange(fed.shape[1], device=fed.device)
        index = (self.length + offsets).expand_as(fed)
        self.tokens.scatter_(1, index, fed)
        self.positions.scatter_(1, index, self.pos.unsqueeze(1) + offsets)
        self.length = self.length + kept
        self.pos += valid
        self.pending = torch.where(valid > 0, next_token, self.pending)
        if self.contiguous:
            self.compact()

    @torch.inference_mode()
    def compact(self) -> None:
        """Move each row's real slots together at the right end and drop slots no row uses.

        Exact for models with explicit position ids (attention ignores where a key sits); needed
        by models whose attention depends on slot distances (T5's relative position bias).
        """
        used = int(self.length)
        order = torch.argsort(self.mask[:, :used].int(), dim=1, stable=True)  # holes first, tokens in order
        keep = max(int(self.mask[:, :used].sum(1).max()), *self.behind.values())
        self.bound = keep
        if keep == used and bool((self.mask[:, 1:used] >= self.mask[:, : used - 1]).all()):
            return  # every row's tokens already sit together at the right end
        order = order[:, used - keep :]
        for name, cache in self.caches.items():  # a lagging cache re-feeds its last slots of the new order
            lag = self.behind.get(name, 0)
            cache.compact(order[:, : keep - lag].clamp(0, max(used - lag - 1, 0)))
        self.mask[:, :keep] = self.mask.gather(1, order)
        self.mask[:, keep:] = False
        self.tokens[:, :keep] = self.tokens.gather(1, order)
        self.positions[:, :keep] = self.positions.gather(1, order)
        self.length = torch.tensor(keep, device=self.length.device)


@dataclass
class Output:
    """Each row's new tokens, whether it is done, and the counters of how they were made."""

    tokens: torch.Tensor  # [B, max_new_tokens + block + 1] new tokens (room for one block past the limit)
    emitted: torch.Tensor  # [B] new tokens so far
    done: torch.Tensor  # [B] EOS seen or max_new_tokens reached
    counts: Counters
    max_new_tokens: int
    eos: torch.Tensor  # [E] end-of-sequence token ids (may be empty)
    pad_token_id: int

    @classmethod
    def empty(cls, batch: int, width: int, block_size: int, max_new_tokens: int, eos: list[int], pad_token_id: int,
              device: torch.device) -> Output:
        return cls(
            tokens=torch.full((batch, width), pad_token_id, dtype=torch.long, device=device),
            emitted=torch.zeros(batch, dtype=torch.long, device=device),
            done=torch.zeros(batch, dtype=torch.bool, device=device),
            counts=Counters(batch, block_size, device),
            max_new_tokens=max_new_tokens,
            eos=torch.tensor(eos, dtype=torch.long, device=device),
            pad_token_id=pad_token_id,
        )

    def emit(self, tokens: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Append the first ``count[b]`` of ``tokens[b]`` to each active row; return how many were kept.

        A row stops at its first end-of-sequence token (kept) or at ``max_new_tokens``.
        """
        k = tokens.shape[1]
        offsets = torch.arange(k, device=tokens.device)
        active = ~self.done
        count = torch.where(active, count, 0)
        is_eos = torch.isin(tokens, self.eos) & (offsets < count.unsqueeze(1))
        hit_eos = is_eos.any(1)
        count = torch.where(hit_eos, is_eos.int().argmax(1) + 1, count)
        count = torch.minimum(count, self.max_new_tokens - self.emitted)
        index = (self.emitted.unsqueeze(1) + offsets).clamp_max(self.tokens.shape[1] - 1)
        keep = offsets < count.unsqueeze(1)
        self.tokens.scatter_(1, index, torch.where(keep, tokens, self.tokens.gather(1, index)))
        self.emitted += count
        self.done |= active & (hit_eos | (self.emitted >= self.max_new_tokens))
        self.counts.add("new_tokens", count)
        return count

    def new_tokens(self) -> torch.Tensor:
        """``[B, max emitted]``: each row's new tokens, right-padded."""
        width = int(self.emitted.max()) if self.emitted.numel() else 0
        new = self.tokens[:, :width]
        filled = torch.arange(width, device=new.device) < self.emitted.unsqueeze(1)
        return torch.where(filled, new, self.pad_token_id)


@dataclass
class DecodeState:
    """A batch being decoded: its slot layout, its output, and its random streams."""

    prompt_ids: torch.Tensor  # [B, L] left-padded (for encoder-decoder pairs: the decoder start token)
    slots: Slots
    out: Output
    streams: RandomStreams
    started: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.prompt_ids.shape[0], device=self.prompt_ids.device)

    def finish(self) -> GenerateOutput:
        wall = time.perf_counter() - self.started
        sequences = torch.cat([self.prompt_ids, self.out.new_tokens()], dim=1)
        return GenerateOutput(sequences=sequences, stats=self.out.counts.finish(wall), prompt_length=self.prompt_ids.shape[1])
