"""What every decoder shares: prompt checks, the decoding state, emitting tokens, and the loop.

Rows are left-padded and share one slot layout in every KV cache. ``state.mask`` marks which
slots hold a real token of each row; ``state.pos`` is the position id of each row's *pending*
token, the last emitted token, which no cache holds yet (the next step feeds it first).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import SpeccascadeError
from .cache import KVCache
from .pairs import ModelPair
from .sampling import RandomStreams, Sampler
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
class DecodeState:
    """Everything that changes while a batch decodes."""

    prompt_ids: torch.Tensor  # [B, L] left-padded
    mask: torch.Tensor  # [B, S] slots holding a real token, shared by every cache
    pos: torch.Tensor  # [B] position id of the pending token
    pending: torch.Tensor  # [B] last emitted token, not yet in any cache
    out: torch.Tensor  # [B, max_new_tokens + block + 1] new tokens
    n_out: torch.Tensor  # [B] new tokens so far
    done: torch.Tensor  # [B] EOS seen or max_new_tokens reached
    streams: RandomStreams
    counts: Counters
    caches: dict[str, KVCache]
    max_new_tokens: int
    eos: torch.Tensor  # [E] end-of-sequence token ids (may be empty)
    pad_token_id: int
    started: float = field(default_factory=time.perf_counter)
    backlog: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (ids, positions) fed to
    # the drafter but not yet to the target (sequential cascade)

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.pending.shape[0], device=self.pending.device)

    def window(self, n: int) -> torch.Tensor:
        """Attention mask over every slot plus ``n`` new ones that each row fills."""
        return torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], n)], dim=1)

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
        count = torch.minimum(count, self.max_new_tokens - self.n_out)
        index = (self.n_out.unsqueeze(1) + offsets).clamp_max(self.out.shape[1] - 1)
        keep = offsets < count.unsqueeze(1)
        self.out.scatter_(1, index, torch.where(keep, tokens, self.out.gather(1, index)))
        self.n_out += count
        self.done |= active & (hit_eos | (self.n_out >= self.max_new_tokens))
        self.counts.add("new_tokens", count)
        return count

    def advance(self, valid: torch.Tensor, slots: int) -> None:
        """Record ``slots`` new cache slots, of which each row's first ``valid[b]`` hold its tokens."""
        new = torch.arange(slots, device=valid.device) < valid.unsqueeze(1)
        self.mask = torch.cat([self.mask, new.to(self.mask.dtype)], dim=1)
        self.pos += valid

    def finish(self) -> GenerateOutput:
        wall = time.perf_counter() - self.started
        width = int(self.n_out.max()) if self.n_out.numel() else 0
        new = self.out[:, :width]
        filled = torch.arange(width, device=new.device) < self.n_out.unsqueeze(1)
        new = torch.where(filled, new, self.pad_token_id)
        sequences = torch.cat([self.prompt_ids, new], dim=1)
        return GenerateOutput(sequences=sequences, stats=self.counts.finish(wall), prompt_length=self.prompt_ids.shape[1])


class Decoder(ABC):
    """A decoder over a model pair; subclasses define how one step extends every row."""

    block_size: int = 1

    def __init__(
        self,
        pair: ModelPair,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> None:
        self.pair = pair
        self.sampler = Sampler(temperature, top_k, top_p)

    @property
    @abstractmethod
    def models(self) -> dict[str, torch.nn.Module]:
        """The models this decoder runs, by cache name."""

    @abstractmethod
    def step(self, state: DecodeState) -> None:
        """Extend every active row by at least one token."""

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        seed: int | Sequence[int] = 0,
    ) -> GenerateOutput:
        """Decode a batch of prompts; see :class:`GenerateOutput`."""
        state = self.start(input_ids, attention_mask, max_new_tokens, seed)
        while not bool(state.done.all()):
            self.step(state)
        return state.finish()

    @torch.inference_mode()
    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        seed: int | Sequence[int] = 0,
    ) -> DecodeState:
        """Check the prompts, prefill every cache with all but each prompt's last token."""
        started = time.perf_counter()
        device = self.pair.device
        ids, mask = left_pad(input_ids, attention_mask)
        ids, mask = ids.to(device), mask.to(device)
        self._check(ids, mask, max_new_tokens)
        batch = ids.shape[0]
        caches = {name: KVCache(model, self.pair.vocab_size) for name, model in self.models.items()}
        context, context_mask = ids[:, :-1], mask[:, :-1]
        if context.shape[1] > 0:
            positions = (context_mask.cumsum(1) - 1).clamp_min(0)
            for cache in caches.values():
                cache.forward(context, positions, context_mask, logits_to_keep=1)
        length = max_new_tokens + self.block_size + 1
        return DecodeState(
            prompt_ids=ids,
            mask=context_mask,
            pos=mask.sum(1) - 1,
            pending=ids[:, -1].clone(),
            out=torch.full((batch, length), self.pair.pad_token_id, dtype=torch.long, device=device),
            n_out=torch.zeros(batch, dtype=torch.long, device=device),
            done=torch.zeros(batch, dtype=torch.bool, device=device),
            streams=RandomStreams(RandomStreams.row_seeds(seed, batch), length, device),
            counts=Counters(batch, self.block_size, device),
            caches=caches,
            max_new_tokens=max_new_tokens,
            eos=torch.tensor(self.pair.eos_token_ids, dtype=torch.long, device=device),
            pad_token_id=self.pair.pad_token_id,
            started=started,
        )

    def _check(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
        lengths = mask.sum(1)
        if ids.shape[0] == 0:
            raise SpeccascadeError("no prompts given: the batch is empty")
        if ids.shape[1] == 0 or bool((lengths == 0).any()):
            row = int((lengths == 0).int().argmax()) if ids.shape[1] else 0
            raise SpeccascadeError(f"prompt {row} is empty: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise SpeccascadeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if int(ids.max()) >= self.pair.vocab_size or int(ids.min()) < 0:
            raise SpeccascadeError(f"prompt token ids must lie in [0, {self.pair.vocab_size})")
        longest = int(lengths.max())
        context = self.pair.context_length
        if context is not None and longest + max_new_tokens + self.block_size > context:
            raise SpeccascadeError(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} (and a block of "
                f"{self.block_size}) exceeds the models' context of {context} tokens"
            )


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end (any padding side in, left padding out)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
    input_ids = input_ids.long()
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    mask = attention_mask.long()
    order = torch.argsort(mask, dim=1, stable=True)  # padding first, real tokens in order after it
    return input_ids.gather(1, order), mask.gather(1, order)
