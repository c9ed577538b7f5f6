"""What every decoder shares: prompt checks, laying out the decoding state, and the loop.

The state (slot layout, output) and the glossary of the decoder's words are in :mod:`.state`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Sequence

import torch

from ..errors import SpeccascadeError
from .cache import KVCache, resolve_layout, sliding
from .pairs import ModelPair, left_pad
from .sampling import RandomStreams, Sampler
from .state import SHRINK, DecodeState, GenerateOutput, Output, Slots
from .stats import DecodeStats


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

    @property
    def hooked(self) -> bool:
        """A hook reads every row of the batch in every block (the rows stay as they started)."""
        return False

    @property
    def drops_rows(self) -> bool:
        """Finished rows may leave the batch: the dynamic cache of a decoder-only pair (which selects rows), no hook."""
        return self.cache == "dynamic" and not self.pair.is_encoder_decoder and not self.hooked

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
        batch_size: int | None = None,
    ) -> GenerateOutput:
        """Decode prompts, at most ``batch_size`` at a time (default: all); see :class:`GenerateOutput`.

        A step that read the host anyway leaves there the tokens still to emit and the rows still decoding
        (``out.left``, ``out.live``); on the CPU the loop reads them itself. They end the loop, and where
        :attr:`drops_rows`, the finished rows leave the batch once at most ``SHRINK`` of it still decodes,
        so the longest reply no longer keeps them in every forward. With prompts waiting (``batch_size``
        below their number), the loop reads the host after every step and, once at most ``SHRINK`` of the
        batch still decodes, waiting prompts take the finished rows' places in place (continuous batching,
        either cache); a hook or an encoder-decoder pair decodes ``batch_size`` prompts after ``batch_size``.
        Otherwise, on CUDA the loop reads the all-done flag one step late (copied while the next step runs),
        so the host never waits for the device; a finished batch runs at most one idle step.
        """
        if batch_size is not None and batch_size < 1:
            raise SpeccascadeError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size is not None and batch_size < input_ids.shape[0] and not self.refills(batch_size):
            return self.in_batches(input_ids, attention_mask, max_new_tokens, seed, batch_size)
        state = self.start(input_ids, attention_mask, max_new_tokens, seed, batch_size)
        late: tuple[torch.Tensor, torch.cuda.Event] | None = None
        while True:
            self.step(state)
            out = state.out
            if out.left is None and (out.room.device.type != "cuda" or state.waiting):
                out.read(out.room.tolist())
            if out.left is not None:
                if state.waiting and out.live <= SHRINK * out.room.shape[0]:
                    state.refill()  # finished rows left over (fewer prompts waited) may leave below
                if out.left == 0:
                    break
                if self.drops_rows and out.live <= SHRINK * out.room.shape[0]:
                    state.keep_live()
                continue
            done = out.done
            if late is not None:
                late[1].synchronize()
                if bool(late[0]):
                    break
            flag = done.all().to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            late = (flag, event)
        return state.finish()

    def refills(self, batch_size: int) -> bool:
        """Whether waiting prompts take finished rows' places in batches of ``batch_size``: a decoder-only pair (either
        cache: a row is replaced in place), no hook, and more than one row (one row alone decodes its prompts one
        after the other, dense)."""
        return not self.pair.is_encoder_decoder and not self.hooked and batch_size > 1

    def in_batches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                   seed: int | Sequence[int], batch_size: int) -> GenerateOutput:
        """Decode ``batch_size`` prompts after ``batch_size``; one output, the stats summed."""
        ids, mask = left_pad(input_ids, attention_mask)
        seeds = RandomStreams.row_seeds(seed, ids.shape[0])
        outs = [self.generate(ids[i : i + batch_size], mask[i : i + batch_size], max_new_tokens, seeds[i : i + batch_size])
                for i in range(0, ids.shape[0], batch_size)]
        width = max(o.sequences.shape[1] for o in outs)
        sequences = torch.cat([torch.nn.functional.pad(o.sequences, (0, width - o.sequences.shape[1]), value=self.pair.pad_token_id)
                               for o in outs])
        return GenerateOutput(sequences, DecodeStats.merge(o.stats for o in outs), outs[0].prompt_length)

    @torch.inference_mode()
    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        seed: int | Sequence[int] = 0,
        batch_size: int | None = None,
    ) -> DecodeState:
        """Check the prompts and lay out the first ``batch_size`` (all by default; the rest wait, see
        :meth:`generate`); every cache takes its prompt in its first step."""
        started = time.perf_counter()
        device, pair = self.pair.device, self.pair
        every, every_mask = left_pad(input_ids, attention_mask)
        every, every_mask = every.to(device), every_mask.to(device)
        self._check(every, every_mask, max_new_tokens)
        seeds = RandomStreams.row_seeds(seed, every.shape[0])
        first = every.shape[0] if batch_size is None else min(batch_size, every.shape[0])
        width = int(every_mask[:first].sum(1).max()) if first < every.shape[0] else every.shape[1]
        ids, mask = every[:first, -width:], every_mask[:first, -width:]
        encoded = {name: None for name in self.models}
        if pair.is_encoder_decoder:  # each model encodes the source once; decoding starts from the start token
            encoded = {name: (model.get_encoder()(input_ids=ids, attention_mask=mask), mask) for name, model in self.models.items()}
            ids = torch.full_like(ids[:, :1], pair.decoder_start_token_id)
            mask = torch.ones_like(ids)
        static = self.cache == "static"
        steady = self.block_size + 2  # the most tokens a step feeds once caught up
        # compaction (static; dynamic with prompts waiting) reclaims rejected slots; the dynamic buffers hold the worst case
        longest = ids.shape[1] if first == every.shape[0] else every.shape[1]  # a waiting prompt may be longer
        capacity = longest + (2 * max_new_tokens + 2 * steady if static else steady * (max_new_tokens + 1))
        caches = {name: KVCache(model, pair.vocab_size, capacity if static else None, self.compile, encoded[name], steady)
                  for name, model in self.models.items()}
        # attention that reads slot distances (T5's relative bias, a sliding window) needs each row's tokens side by side
        contiguous = pair.is_encoder_decoder or any(sliding(model) for model in self.models.values())
        slots = Slots.for_prompts(ids, mask, caches, capacity, pair.pad_token_id, static, contiguous=contiguous)
        room = max_new_tokens + self.block_size + 1
        out = Output.empty(every.shape[0], room, self.block_size, max_new_tokens, pair.eos_token_ids, pair.pad_token_id, device)
        streams = RandomStreams(seeds[:first], room, device)
        if first == every.shape[0]:
            return DecodeState(ids, slots, out, streams, started)
        out.keep(torch.arange(first, device=device))
        return DecodeState(every, slots, out, streams, started, waiting=list(range(first, every.shape[0])),
                           prompt_mask=every_mask, seeds=seeds)

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
