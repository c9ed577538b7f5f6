"""What every decoder shares: prompt checks, the decoding state, emitting tokens, and the loop.

Rows are left-padded and share one slot layout in every KV cache. ``state.mask`` marks which
of ``state.length`` used slots hold a real token of each row; ``state.pos`` is the position id of
each row's *pending* token, the last emitted token, which no cache holds yet (the next step feeds
it first). With the static cache ``length`` is a device tensor, so nothing in a step waits for the
host; with the dynamic one it is an int.

A cache may lag behind the layout by ``state.behind[name]`` slots; its next forward re-feeds
them first (``catch_up``). That one mechanism does the prefill (every cache starts behind by the
whole prompt, so the prompt goes into each model's first step), lets the target skip tokens in the
sequential cascade, and lets the drafter skip the step whose output nothing reads.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import SpeccascadeError
from .cache import KVCache, resolve_layout
from .pairs import ModelPair, left_pad
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
    mask: torch.Tensor  # [B, capacity] bool: slots holding a real token, shared by every cache
    length: int | torch.Tensor  # slots in use (0-dim device tensor with the static cache)
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
    tokens: torch.Tensor | None = None  # [B, capacity] the token id in each slot
    positions: torch.Tensor | None = None  # [B, capacity] its position id
    behind: dict[str, int] = field(default_factory=dict)  # slots at the end each cache still lacks
    bound: int = 0  # host-side upper bound on ``length``, so overflow is checked without a sync
    contiguous: bool = False  # compact after every step (models whose attention reads slot distances)

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.pending.shape[0], device=self.pending.device)

    @property
    def static(self) -> bool:
        return isinstance(self.length, torch.Tensor)

    def window(self, n: int) -> torch.Tensor:
        """Attention mask over the used slots plus ``n`` new ones that each row fills."""
        slot = torch.arange(self.mask.shape[1], device=self.mask.device)
        window = self.mask | ((slot >= self.length) & (slot < self.length + n))
        return window if self.static else window[:, : self.length + n]

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
        self.length = torch.tensor(keep, device=self.mask.device) if self.static else keep

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

    def advance(self, ids: torch.Tensor, valid: torch.Tensor, slots: int | torch.Tensor) -> None:
        """Record ``slots`` new cache slots fed with ``ids`` (from the pending token's position on);
        each row's first ``valid[b]`` hold its tokens."""
        slot = torch.arange(self.mask.shape[1], device=valid.device)
        self.mask |= (slot >= self.length) & (slot < self.length + valid.unsqueeze(1))
        offsets = torch.arange(ids.shape[1], device=ids.device)
        index = (self.length + offsets).expand_as(ids)
        self.tokens.scatter_(1, index, ids)
        self.positions.scatter_(1, index, self.pos.unsqueeze(1) + offsets)
        self.length = self.length + slots
        self.pos += valid
        if self.contiguous:
            self.compact()

    def finish(self) -> GenerateOutput:
        wall = time.perf_counter() - self.started
        width = int(self.n_out.max()) if self.n_out.numel() else 0
        new = self.out[:, :width]
        filled = torch.arange(width, device=new.device) < self.n_out.unsqueeze(1)
        new = torch.where(filled, new, self.pad_token_id)
        sequences = torch.cat([self.prompt_ids, new], dim=1)
        return GenerateOutput(sequences=sequences, stats=self.counts.finish(wall), prompt_length=self.prompt_ids.shape[1])


class Decoder(ABC):
    """A decoder over a model pair; subclasses define how one step extends every row.

    ``cache``: ``"dynamic"`` or ``"static"`` KV caches (default: static on CUDA, where it saves the
    host syncs, dynamic on the CPU); ``compile``: ``torch.compile`` the models' decode steps
    (static cache only). Both give the same tokens as the default path.
    """

    block_size: int = 1

    def __init__(
        self,
        pair: ModelPair,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cache: str | None = None,
        compile: bool = False,
    ) -> None:
        self.pair = pair
        self.sampler = Sampler(temperature, top_k, top_p)
        self.cache = resolve_layout(cache, compile, pair.device, [pair.drafter, pair.target])
        self.compile = compile

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
        """Decode a batch of prompts; see :class:`GenerateOutput`.

        On CUDA the loop reads the all-done flag one step late (copied while the next step runs),
        so the host never waits for the device; a finished batch runs at most one idle step.
        """
        state = self.start(input_ids, attention_mask, max_new_tokens, seed)
        late: tuple[torch.Tensor, torch.cuda.Event] | None = None
        while True:
            self.step(state)
            if state.done.device.type != "cuda":
                if bool(state.done.all()):
                    break
                continue
            if late is not None:
                late[1].synchronize()
                if bool(late[0]):
                    break
            flag = state.done.all().to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            late = (flag, event)
        return state.finish()

    @torch.inference_mode()
    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        seed: int | Sequence[int] = 0,
    ) -> DecodeState:
        """Check the prompts and lay them out; every cache takes its prompt in its first step."""
        started = time.perf_counter()
        device = self.pair.device
        ids, mask = left_pad(input_ids, attention_mask)
        ids, mask = ids.to(device), mask.to(device)
        self._check(ids, mask, max_new_tokens)
        encoded = {name: None for name in self.models}
        if self.pair.is_encoder_decoder:  # each model encodes the source once; decoding starts from the start token
            encoded = {name: (model.get_encoder()(input_ids=ids, attention_mask=mask), mask) for name, model in self.models.items()}
            ids = torch.full_like(ids[:, :1], self.pair.decoder_start_token_id)
            mask = torch.ones_like(ids)
        prompt_ids = ids
        batch, width = ids.shape
        steady = self.block_size + 2  # the most tokens a step feeds once caught up
        # compaction (static) reclaims rejected slots; the dynamic buffers hold the worst case
        capacity = width + (2 * max_new_tokens + 2 * steady if self.cache == "static" else steady * (max_new_tokens + 1))
        caches = {
            name: KVCache(model, self.pair.vocab_size, capacity if self.cache == "static" else None, self.compile,
                          encoded[name], steady)
            for name, model in self.models.items()
        }
        # the prompt but its last token goes into each model's first step (every cache starts behind)
        context_mask = mask[:, :-1].bool()
        slots = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        slots[:, : width - 1] = context_mask
        tokens = torch.full((batch, capacity), self.pair.pad_token_id, dtype=torch.long, device=device)
        tokens[:, : width - 1] = ids[:, :-1]
        positions = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        positions[:, : width - 1] = (context_mask.cumsum(1) - 1).clamp_min(0)
        length = max_new_tokens + self.block_size + 1
        return DecodeState(
            prompt_ids=prompt_ids,
            mask=slots,
            length=torch.tensor(width - 1, device=device) if self.cache == "static" else width - 1,
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
            tokens=tokens,
            positions=positions,
            behind={name: width - 1 for name in caches},
            bound=width - 1,
            contiguous=self.pair.is_encoder_decoder,
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
