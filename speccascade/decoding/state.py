"""What changes while a batch decodes: the slot layout of the KV caches, and the output.

The decoder's words, defined once:

- **slot**: one column of the KV caches. Every row of a batch and every cache share one slot
  layout, so slot ``j`` is the same column everywhere; ``Slots.tokens``/``positions`` say which
  token and position id sit there, ``Slots.mask`` whether it is one of the row's real tokens.
- **hole**: a slot that holds no real token of a row (its left padding, or a draft that row
  rejected while another row kept its own). Holes are masked out of attention, never zero-filled,
  and every row carries its own position ids, so they change nothing.
- **length**: slots in use, the same for every row. Kept where the caches keep their own length: a
  0-dim tensor on the device for the static cache (no step waits for the host), a Python int for the
  dynamic one (whose crop takes a host count).
- **pending token**: a row's last emitted token. No cache holds it yet: the next step feeds it
  first. ``pos`` is its position id, which is also the number of real tokens cached before it.
- **behind** (lag): how many slots at the end of the layout a cache still lacks. ``catch_up``
  re-feeds them in front of the cache's next input. Every cache starts behind by the prompt (so the
  prompt goes into each model's first step), the target falls behind in the sequential cascade on
  tokens it did not decide, and the drafter lags one slot after a block whose ``q_{gamma+1}``
  nothing read (``drafter_lag``, or ``bonus_on_demand`` where no row accepted every draft: it
  skipped that step).
- **window**: the attention mask of a forward: each row's real slots plus the ``n`` new slots it
  fills. It is the slot mask itself, whose new slots are marked real from ``open`` to ``advance``.
- **dense**: no row has a hole, for the whole decode: one unpadded prompt with the dynamic cache (a
  single row keeps exactly the slots it uses). The mask is then not kept and a forward gets no window
  (``None``): the model's own causal mask is the same, and it skips reading the mask on the host.
- **open**: make room for a step's ``n`` new slots, mark them in the window and compute, once per
  step, the position ids of the tokens it will feed (``Slots.block``).
- **advance**: record the slots a step fed (the pending token first; row ``b``'s first ``valid[b]``
  are its tokens, the rest holes) and make the next token pending.
- **rollback**: drop from every cache the newest slots that no row kept.
- **compact**: move each row's real slots together at the right end and drop the slots no row
  uses (T5 reads slot distances as positions, a sliding window counts slots; the static cache reuses the space).
- **emit**: append a step's tokens to each row's output; a row is **done** at its first
  end-of-sequence token or at ``max_new_tokens``; ``emitted`` counts a row's new tokens, ``room``
  the tokens it may still emit (0 once done).
- **keep**: drop the rows that are done from the batch, once at most ``SHRINK`` of it still decodes
  (``Decoder.drops_rows``): their tokens and counts are banked under their place in the batch as it
  started, their cache rows dropped; the rows left go on with the same slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import SpeccascadeError
from .cache import KVCache
from .sampling import RandomStreams
from .stats import Counters, DecodeStats

SHRINK = 0.75  # finished rows leave a batch once at most this share of it is still decoding


@dataclass
class GenerateOutput:
    """``sequences``: prompt (left-padded) + new tokens, right-padded after EOS; plus the stats."""

    sequences: torch.Tensor
    stats: DecodeStats
    prompt_length: int

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


class Block(NamedTuple):
    """The ``n`` new slots a step fills: its attention ``window`` ``[B, capacity]`` (None when dense), the ``positions``
    ``[B, n]`` of the tokens it feeds (the pending token's, then one more per slot) and the new slots'
    ``index`` ``[n]``."""

    window: torch.Tensor | None
    positions: torch.Tensor
    index: torch.Tensor


class Aranges:
    """``arange(start, start + n)`` for every ``n`` up to ``size``, each sliced once (a slice is an operator per call)."""

    def __init__(self, size: int, device: torch.device, start: int = 0) -> None:
        self.full = torch.arange(start, start + size, device=device)
        self.cut: dict[int, torch.Tensor] = {}

    def __call__(self, n: int) -> torch.Tensor:
        if n not in self.cut:
            self.cut[n] = self.full[:n]
        return self.cut[n]


def laid_out(ids: torch.Tensor, mask: torch.Tensor, capacity: int, start: int, pad_token_id: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts ``[k, w]`` in a slot buffer of ``capacity``: every token but the last in slots
    ``start .. start + w - 2``, the rest holes; the slot ``mask``, ``tokens`` and ``positions``, each ``[k, capacity]``."""
    batch, width = ids.shape
    context = mask[:, :-1].bool()
    new = slice(start, start + width - 1)
    slots = torch.zeros(batch, capacity, dtype=torch.bool, device=ids.device)
    slots[:, new] = context
    tokens = torch.full((batch, capacity), pad_token_id, dtype=torch.long, device=ids.device)
    tokens[:, new] = ids[:, :-1]
    positions = torch.zeros_like(tokens)
    positions[:, new] = (context.cumsum(1) - 1).clamp_min(0)
    return slots, tokens, positions


@dataclass
class Slots:
    """The slot layout every KV cache of a batch shares, and the caches laid out in it."""

    caches: dict[str, KVCache]
    mask: torch.Tensor  # [B, capacity] bool: slots holding a real token of the row
    tokens: torch.Tensor  # [B, capacity] the token id in each slot
    positions: torch.Tensor  # [B, capacity] its position id
    length: torch.Tensor | int  # slots in use (a 0-dim tensor on the device for the static cache, an int for the dynamic one)
    pending: torch.Tensor  # [B, 1] each row's pending token
    pos: torch.Tensor  # [B] its position id
    behind: dict[str, int]  # slots at the end each cache still lacks
    contiguous: bool = False  # compact after every step (models whose attention reads slot distances)
    dense: bool = False  # no row ever has a hole (one unpadded row, dynamic cache): ``mask`` is not kept, windows are None
    bound: int = 0  # host-side upper bound on ``length``: overflow is checked without a sync
    block: Block | None = None  # the slots the current step fills (set by ``open``)

    def __post_init__(self) -> None:
        self.first = Aranges(self.mask.shape[1], self.mask.device)  # slot indices, built once
        self.slot = self.first.full
        self.pos_column = self.pos.unsqueeze(1)  # [B, 1], a view: follows ``pos``, which is only updated in place

    @classmethod
    def for_prompts(
        cls, ids: torch.Tensor, mask: torch.Tensor, caches: dict[str, KVCache], capacity: int, pad_token_id: int,
        static: bool, contiguous: bool = False,
    ) -> Slots:
        """Lay out left-padded prompts: every token but the last in the slots (no cache holds them yet:
        each cache starts behind by all of them), the last one pending. ``static``: the length lives on
        the device (a static cache's fill counter) rather than on the host."""
        width = ids.shape[1]
        slots, tokens, positions = laid_out(ids, mask, capacity, 0, pad_token_id)
        length = torch.tensor(width - 1, device=ids.device) if static else width - 1
        dense = ids.shape[0] == 1 and not static and not contiguous and bool(slots[:, : width - 1].all())
        return cls(caches, slots, tokens, positions, length,
                   pending=ids[:, -1:].clone(), pos=mask.sum(1) - 1, behind={name: width - 1 for name in caches},
                   contiguous=contiguous, bound=width - 1, dense=dense)

    def replace(self, rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int) -> list[str]:
        """Put the left-padded prompts ``ids`` ``[k, w]`` in the batch rows ``rows`` (finished ones) in place: the layout
        is compacted, a new row's tokens but the last take its last ``w - 1`` slots (its slots before are holes; where
        the other rows hold fewer, the layout grows by holes at its start), and the last is pending; every row's
        tokens stay side by side at the layout's end. Each cache computes the new rows' keys and values over the
        slots it holds in a forward of its own over those rows (its catch-up feeds the rest); returns the names of
        the caches that ran one."""
        need = ids.shape[1] - 1
        self.compact()
        grow = max(0, need - int(self.length))
        if grow:
            self.reserve(grow)
            for cache in self.caches.values():
                cache.add_holes(grow)
            self.mask, self.tokens, self.positions = (
                torch.cat([torch.full_like(t[:, :grow], fill), t[:, :-grow]], 1)
                for t, fill in ((self.mask, False), (self.tokens, pad_token_id), (self.positions, 0)))
            self.length = self.length + grow
        start = int(self.length) - need
        slots, tokens, positions = laid_out(ids, mask, self.mask.shape[1], start, pad_token_id)
        prefilled = []
        for name, cache in self.caches.items():
            held = int(self.length) - self.behind.get(name, 0)  # the slots this cache holds
            fed = slice(start, max(start, held))
            cache.replace_rows(rows, tokens[:, fed], positions[:, fed], slots[:, fed], held)
            prefilled += [name] if held > start else []
        self.mask[rows], self.tokens[rows], self.positions[rows] = slots, tokens, positions
        self.pending[rows], self.pos[rows] = ids[:, -1:], mask.sum(1) - 1
        self.block = None
        return prefilled

    def open(self, n: int) -> Block:
        """Make room for a step's ``n`` new slots and mark them real in the mask, which is then the step's
        window (slots past ``length`` are never real before); its positions, computed once for all its
        forwards. :meth:`advance` writes the new slots' own mask. A dense layout has no window."""
        self.reserve(n)
        index = self.slot[self.length : self.length + n] if isinstance(self.length, int) else self.first(n) + self.length
        window = None if self.dense else self.mask.index_fill_(1, index, True)
        self.block = Block(window, self.pos_column + self.first(n), index)
        return self.block

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the batch rows ``rows`` (in that order) in the layout and in every cache."""
        for cache in self.caches.values():
            cache.select_rows(rows)
        self.mask, self.tokens, self.positions = self.mask[rows], self.tokens[rows], self.positions[rows]
        self.pending, self.pos = self.pending[rows], self.pos[rows]
        self.pos_column = self.pos.unsqueeze(1)
        self.block = None

    def catch_up(self, name: str, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids``/``positions`` ``[B, n]`` for cache ``name``, preceded by the slots it lacks; it lacks none after."""
        k = self.behind.get(name, 0)
        if k == 0:
            return ids, positions
        self.behind[name] = 0
        # the last k slots: a view where the length is a host int (dynamic cache), indices where it is on the device
        last = slice(self.length - k, self.length) if isinstance(self.length, int) else self.first(k) + (self.length - k)
        return torch.cat([self.tokens[:, last], ids], 1), torch.cat([self.positions[:, last], positions], 1)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more slots, compacting the caches when the buffer would overflow."""
        if self.bound + n > self.mask.shape[1]:
            self.compact()
            if self.bound + n > self.mask.shape[1]:
                raise SpeccascadeError(f"the KV cache of {self.mask.shape[1]} slots cannot hold {n} more")
        self.bound += n

    def rollback(self, fed: int, kept: int | torch.Tensor) -> None:
        """Of the ``fed`` slots a step added, keep the ``kept`` that some row still uses (an int for the dynamic
        cache, a 0-dim device tensor for the static one): every cache drops the rest."""
        for cache in self.caches.values():
            cache.rollback(fed - kept)

    def advance(self, fed: torch.Tensor, valid: torch.Tensor, kept: int | torch.Tensor, next_token: torch.Tensor) -> None:
        """Record ``kept`` new slots holding ``fed`` ``[B, n]`` (the pending token first; row ``b``'s first
        ``valid[b]`` are its tokens, the rest holes), at the first ``n`` slots the step opened, and make
        ``next_token`` ``[B, 1]`` pending where ``valid > 0``. Slots past ``length`` are never real, so the
        slots are written whole, in place. (A done row's pending token is never emitted, but it is fed, and
        what a done row feeds moves the other rows' logits by float rounding: it stays the same.)"""
        index, positions = self.block.index, self.block.positions
        if not self.dense:
            self.mask.index_copy_(1, index, self.first(index.shape[0]) < valid.unsqueeze(1))  # every opened slot
        if fed.shape[1] < index.shape[0]:  # the step fed fewer than it opened (``draft_stop`` ended every block early)
            index, positions = index[: fed.shape[1]], positions[:, : fed.shape[1]]
        self.tokens.index_copy_(1, index, fed)
        self.positions.index_copy_(1, index, positions)
        self.length = self.length + kept
        self.pos += valid
        self.pending = next_token
        if self.contiguous:
            self.compact()

    @torch.inference_mode()
    def compact(self) -> None:
        """Move each row's real slots together at the right end and drop slots no row uses.

        Exact for models with explicit position ids (attention ignores where a key sits); needed
        by models whose attention depends on slot distances (T5's relative position bias).
        """
        used = int(self.length)
        if self.dense:  # every slot is real: the tokens already sit together
            self.bound = used
            return
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
        self.length = torch.full_like(self.length, keep) if isinstance(self.length, torch.Tensor) else keep


@dataclass
class Output:
    """Each row's new tokens, whether it is done, and the counters of how they were made."""

    tokens: torch.Tensor  # [B, max_new_tokens + block + 1] new tokens (room for one block past the limit)
    emitted: torch.Tensor  # [B] new tokens so far
    room: torch.Tensor  # [B] new tokens a row may still emit: max_new_tokens - emitted, 0 once done
    counts: Counters
    max_new_tokens: int
    eos: torch.Tensor  # [E] end-of-sequence token ids (may be empty)
    pad_token_id: int
    left: int | None = None  # the most new tokens a row still lacks, as read on the host after the last step
    live: int | None = None  # the rows still decoding, read with ``left``

    def __post_init__(self) -> None:
        self.offsets = Aranges(self.tokens.shape[1], self.tokens.device)  # token offsets, built once
        self.ends = Aranges(self.tokens.shape[1], self.tokens.device, start=1)  # offsets + 1
        self.emitted_column = self.emitted.unsqueeze(1)  # [B, 1], a view: follows ``emitted``, only updated in place
        self.banked = (self.tokens, self.emitted)  # every row's tokens, in that order: written back as rows leave

    def read(self, room: list[int]) -> None:
        """Note what a host read of ``room`` says: the most tokens a row lacks (``left``) and the rows still decoding."""
        self.left, self.live = max(room), len(room) - room.count(0)

    def keep(self, rows: torch.Tensor | None = None) -> None:
        """Bank every row's tokens under its place in the starting batch, then decode on the batch rows ``rows``
        alone (the others have finished); ``None`` banks and keeps every row."""
        tokens, emitted = self.banked
        if tokens is not self.tokens:  # rows have left before: write the current ones back
            tokens.index_copy_(0, self.counts.index, self.tokens)  # each row's place in the batch as it started
            emitted.index_copy_(0, self.counts.index, self.emitted)
        self.counts.keep(rows)
        if rows is not None:
            self.tokens, self.emitted, self.room = self.tokens[rows], self.emitted[rows], self.room[rows]
            self.emitted_column = self.emitted.unsqueeze(1)

    @classmethod
    def empty(cls, batch: int, width: int, block_size: int, max_new_tokens: int, eos: list[int], pad_token_id: int,
              device: torch.device) -> Output:
        return cls(
            tokens=torch.full((batch, width), pad_token_id, dtype=torch.long, device=device),
            emitted=torch.zeros(batch, dtype=torch.long, device=device),
            room=torch.full((batch,), max_new_tokens, dtype=torch.long, device=device),
            counts=Counters(batch, block_size, device),
            max_new_tokens=max_new_tokens,
            eos=torch.tensor(eos, dtype=torch.long, device=device),
            pad_token_id=pad_token_id,
            left=max_new_tokens,
        )

    def emit(self, tokens: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Append the first ``n[b] + 1`` of ``tokens[b]`` to each row still decoding (a block's ``n`` accepted
        drafts and the token after them); return them, ``valid`` ``[B]``: ``n + 1``, 0 for a row done before.

        A row stops at its first end-of-sequence token (kept) or at ``max_new_tokens``, but ``valid`` counts
        the block's tokens past them too: the caches keep them, so that a row's end changes no other row's
        cache length. All of ``tokens`` is written after each row's kept tokens (the buffer has room for a
        block past the limit); what lies past ``emitted`` is overwritten later or cut by :meth:`new_tokens`.
        """
        width = tokens.shape[1]
        valid = torch.where(self.room > 0, n + 1, 0)
        end = torch.where(torch.isin(tokens, self.eos), self.ends(width), width + 1).amin(1)  # [B]: one past the first EOS
        hit_eos = end <= valid
        count = torch.minimum(torch.minimum(valid, end), self.room)
        self.tokens.scatter_(1, self.emitted_column + self.offsets(width), tokens)
        self.emitted += count
        self.room -= count
        self.room.masked_fill_(hit_eos, 0)
        self.left = None
        return valid

    @property
    def done(self) -> torch.Tensor:
        """``[B]`` bool: the row saw its end-of-sequence token or reached ``max_new_tokens`` (computed when read)."""
        return self.room == 0

    def replace(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Bank every row's tokens and counts, then decode the prompts at places ``index`` of the batch as it started
        (none decoded yet) in the batch rows ``rows``."""
        self.keep()
        self.counts.index[rows] = index
        self.tokens[rows], self.emitted[rows], self.room[rows] = self.pad_token_id, 0, self.max_new_tokens
        self.read(self.room.tolist())

    def new_tokens(self) -> torch.Tensor:
        """``[B, max emitted]``: each row's new tokens, right-padded, in the order the batch started in."""
        tokens, emitted = self.banked
        width = int(emitted.max()) if emitted.numel() else 0
        new = tokens[:, :width]
        filled = torch.arange(width, device=new.device) < emitted.unsqueeze(1)
        return torch.where(filled, new, self.pad_token_id)


@dataclass
class DecodeState:
    """A batch being decoded: its slot layout, its output, and its random streams."""

    prompt_ids: torch.Tensor  # [N, L] every prompt, left-padded (for encoder-decoder pairs: the decoder start token)
    slots: Slots
    out: Output
    streams: RandomStreams
    started: float = field(default_factory=time.perf_counter)
    waiting: list[int] = field(default_factory=list)  # prompts not started yet, by place (continuous batching)
    prompt_mask: torch.Tensor | None = None  # [N, L] the prompts' attention mask, where prompts wait
    seeds: list[int] = field(default_factory=list)  # every prompt's seed, where prompts wait

    def __post_init__(self) -> None:
        self.places = torch.arange(self.prompt_ids.shape[0], device=self.prompt_ids.device)  # row indices, built once
        self.rows = self.places[: self.out.room.shape[0]]
        self.fills: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def keep_live(self) -> None:
        """Drop the rows that have finished from the batch: their tokens and counts are banked, their slots and
        cache rows dropped (the dynamic cache of a decoder-only model; see ``Decoder.drops_rows``)."""
        rows = (self.out.room > 0).nonzero().squeeze(1)
        self.slots.keep(rows)
        self.out.keep(rows)
        self.streams.keep(rows)
        self.rows = self.places[: rows.shape[0]]
        self.fills = {}

    @torch.inference_mode()
    def refill(self) -> None:
        """Let waiting prompts take the places of finished rows, in place (each new row's prompt trimmed to the longest
        of those joining)."""
        rows = (self.out.room == 0).nonzero().squeeze(1)[: len(self.waiting)]
        index, self.waiting = self.places[self.waiting[: rows.shape[0]]], self.waiting[rows.shape[0] :]
        ids, mask = self.prompt_ids[index], self.prompt_mask[index]
        width = int(mask.sum(1).max())
        for name in self.slots.replace(rows, ids[:, -width:], mask[:, -width:], self.out.pad_token_id):
            self.out.counts.forwards[name] += 1
        self.out.replace(rows, index)
        self.streams.replace(rows, [self.seeds[i] for i in index.tolist()])

    def filled(self, value: int) -> torch.Tensor:
        """``[B]`` filled with ``value`` (each row's draft count in a fixed block), built once per value; read only."""
        if value not in self.fills:
            self.fills[value] = torch.full_like(self.rows, value)
        return self.fills[value]

    @torch.inference_mode()
    def finish(self) -> GenerateOutput:
        """The sequences and the stats; each row's new tokens are counted here, once (in inference mode, as the
        counters were made: a caller may finish a decode outside it)."""
        self.out.keep()  # every row's tokens and counts, in the order the batch started in
        wall = time.perf_counter() - self.started
        sequences = torch.cat([self.prompt_ids, self.out.new_tokens()], dim=1)
        stats = self.out.counts.finish(wall, new_tokens=self.out.banked[1])
        return GenerateOutput(sequences=sequences, stats=stats, prompt_length=self.prompt_ids.shape[1])
