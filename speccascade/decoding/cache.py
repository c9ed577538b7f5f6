"""One model's KV cache behind a small adapter: forward over new tokens, roll back by count, compact.

Two layouts, the same results:

- ``dynamic`` (transformers' ``DynamicCache``): grows by concatenation; rolling back crops it, which
  needs the count on the host. Its ``crop`` takes a negative count in transformers 5.x (an
  absolute length in 4.x); the supported range is pinned in pyproject.toml and this module is the
  only place that calls it.
- ``static`` (``StaticCache``): preallocated, written at positions, as gpt-fast does. Rolling back
  only lowers each layer's fill counter, on the device, so the decoder never waits for the host;
  every shape stays fixed, which is what ``torch.compile`` with CUDA graphs needs.

Batched rows share one slot layout: a slot that holds no token of a row (left padding, or a draft
the row rejected) is masked out by the decoder's 2D attention mask, never zero-filled, and every
row carries its own position ids. Models with SDPA attention over every slot get that mask in the 4D
form transformers would build from it, ready-made (``KVCache._prepared``). ``compact`` moves each row's
real slots together at the right end, for models whose attention depends on slot distances (T5's
relative bias, sliding windows, whose layers here keep every slot) and to reuse a static cache's space.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel, StaticCache

from ..errors import SpeccascadeError

LAYOUTS = ("dynamic", "static")


class KVCache:
    """A KV cache for ``model`` with positional rollback (``capacity`` slots when static).

    ``forward`` and ``rollback`` run in the caller's inference mode (the decoders' ``step``, which holds it
    for the whole block): a decorator would enter it again on every call, a few microseconds each."""

    def __init__(
        self,
        model: PreTrainedModel,
        vocab_size: int | None = None,
        capacity: int | None = None,
        compile: bool = False,
        encoded: tuple[object, torch.Tensor] | None = None,
        steady: int = 8,
    ) -> None:
        self.model = model
        self.encoded = encoded  # (encoder outputs, source mask) of an encoder-decoder model
        self.vocab_size = vocab_size  # logits are cut to the pair's shared vocabulary
        self.static = capacity is not None  # the layout is checked once, by resolve_layout
        config = model.config
        if encoded is not None:
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            # a sliding window's layers keep every slot (transformers masks the window): rollback and compaction need them
            self.cache = (StaticCache(config=config, max_cache_len=capacity) if self.static
                          else DynamicCache() if sliding(model) else DynamicCache(config=config))
        self._cache_arg = cache_argument(getattr(model.forward, "__func__", model.forward))
        # decode steps (at most ``steady`` tokens, fixed shapes) run compiled; longer inputs (the prompt) eagerly
        self._step = torch.compile(model, mode="reduce-overhead", dynamic=False) if compile else model
        self.steady = steady
        self._prepares_mask = encoded is None and takes_prepared_mask(model)
        self._causal = torch.ones(0, 0, dtype=torch.bool)  # [i, j]: slot j <= slot i (dynamic), grown on demand

    def __len__(self) -> int:
        """Number of slots held (the same for every layer): read off tensor shapes for the dynamic cache, a
        host sync for the static one."""
        return int(self.cache.get_seq_length())

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append ``input_ids`` ``[B, n]``; return float32 logits ``[B, n, V]`` (and last hidden states).

        ``attention_mask`` covers the decoder's whole slot buffer, ``[B, capacity]``: the static cache
        reads all of it, the dynamic one its first ``len(self) + n`` columns (its own slots and the
        new ones); ``None`` where every slot is real (the model's causal mask). ``logits_to_keep`` > 0
        computes logits (and returns hidden states) for that many last positions only.
        """
        if attention_mask is not None and self._prepares_mask:
            attention_mask = self._prepared(attention_mask, input_ids.shape[1])
        elif attention_mask is not None and not self.static:
            attention_mask = attention_mask[:, : len(self) + input_ids.shape[1]]
        if self.encoded is not None:  # positions are slot distances (T5): the decoder keeps slots contiguous
            encoder_outputs, source_mask = self.encoded
            out = self.model(
                encoder_outputs=encoder_outputs, attention_mask=source_mask, decoder_input_ids=input_ids,
                decoder_attention_mask=attention_mask, use_cache=True, output_hidden_states=hidden_states,
                **{self._cache_arg: self.cache},
            )
            hidden = out.decoder_hidden_states[-1] if hidden_states else None
        else:
            out = (self._step if input_ids.shape[1] <= self.steady else self.model)(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                use_cache=True,
                output_hidden_states=hidden_states,
                logits_to_keep=logits_to_keep,
                **{self._cache_arg: self.cache},
            )
            hidden = out.hidden_states[-1] if hidden_states else None
        logits = out.logits  # cut only where the model computed more than asked for (no operator otherwise)
        logits = logits[:, -logits_to_keep:] if 0 < logits_to_keep < logits.shape[1] else logits
        hidden = hidden[:, -logits_to_keep:] if hidden is not None and 0 < logits_to_keep < hidden.shape[1] else hidden
        logits = logits if self.vocab_size in (None, logits.shape[-1]) else logits[..., : self.vocab_size]
        return (logits if logits.dtype == torch.float32 else logits.float()), hidden

    def _prepared(self, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        """The 4D mask transformers' SDPA path would build from the 2D one, ``[B, 1, n, slots]``: new token ``i``,
        written at slot ``fill + i``, sees slot ``j`` where ``j <= fill + i`` and the row's slot ``j`` is real. A
        few operators instead of transformers' mask building on every forward, which for one new token also reads
        on the host whether the 2D mask has holes. The dynamic cache slices a causal template at ``len(self)``;
        the static one compares slot indices with its fill counter on the device (all slots: fixed shapes)."""
        if self.static:
            slots = self._slots(attention_mask.shape[1], attention_mask.device)
            query = self.cache.layers[0].cumulative_length + slots[:n]
            return attention_mask[:, None, None, :].bool() & (slots <= query[:, None])
        end = len(self) + n
        if self._causal.shape[0] < end:
            size = max(end, 2 * self._causal.shape[0])
            self._causal = torch.ones(size, size, dtype=torch.bool, device=attention_mask.device).tril_()
        return attention_mask[:, None, None, :end].bool() & self._causal[end - n : end, :end]

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def _slots(capacity: int, device: torch.device) -> torch.Tensor:
        """Slot indices ``0 .. capacity - 1``, built once per capacity and device."""
        return torch.arange(capacity, device=device)

    def rollback(self, n: torch.Tensor | int) -> None:
        """Drop the newest ``n`` slots: a 0-dim tensor on the device for the static cache (its fill counters drop
        in place), a host int for the dynamic one (whose layers are cut to a view, no copy)."""
        if self.static:
            for layer in self.cache.layers:
                layer.cumulative_length.sub_(n)
            return
        if n > 0:
            self.cache.crop(-n)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the batch rows ``rows`` in that order (a row named twice is copied): the dynamic cache only."""
        if self.static or self.encoded is not None:
            raise SpeccascadeError("only a decoder-only model's dynamic cache selects rows")
        self.cache.batch_select_indices(rows)

    def replace_rows(self, rows: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                     length: int) -> None:
        """Give the batch rows ``rows`` to new prompts (decoder-only models): their ``ids`` ``[k, n]`` (with
        ``positions`` and slot ``mask``) fill the last ``n`` of the cache's first ``length`` slots, the slots
        before are holes (zeros). The keys and values come from a forward over the new rows alone, in a cache of
        their own; a static cache's slots past ``length`` keep what they held, masked out until written."""
        if self.encoded is not None:
            raise SpeccascadeError("an encoder-decoder model's cache replaces no rows")
        k, n = ids.shape
        if n:
            fresh = KVCache(self.model, self.vocab_size, steady=self.steady)
            fresh.forward(ids, positions, mask, logits_to_keep=1)
        for i, layer in enumerate(self.cache.layers):
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(k, old.shape[1], length, old.shape[3])
                if n:
                    new[:, :, length - n :] = getattr(fresh.cache.layers[i], name)
                old[rows, :, :length] = new

    def add_holes(self, n: int) -> None:
        """Put ``n`` hole slots (zeros, masked out) in front of every row's slots."""
        for layer in self.cache.layers:
            if self.static:  # in place: the static address stays
                used = int(layer.cumulative_length)
                for t in (layer.keys, layer.values):
                    t[:, :, n : n + used] = t[:, :, :used].clone()
                    t[:, :, :n] = 0
                layer.cumulative_length.add_(n)
            else:
                layer.keys, layer.values = (torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[3]), t], 2)
                                            for t in (layer.keys, layer.values))

    @torch.inference_mode()
    def compact(self, order: torch.Tensor) -> None:
        """Keep, for each row ``b``, the slots ``order[b]`` (``[B, L]``) in that order: the cache becomes ``L`` long."""
        length = order.shape[1]
        layers = self.cache.self_attention_cache.layers if self.encoded is not None else self.cache.layers
        for layer in layers:
            if not layer.is_initialized:
                continue
            for name in ("keys", "values"):
                old = getattr(layer, name)
                index = order[:, None, :, None].expand(old.shape[0], old.shape[1], length, old.shape[3])
                moved = old.gather(2, index)
                if self.static:
                    old[:, :, :length].copy_(moved)  # in place: the static address stays
                else:
                    setattr(layer, name, moved)
            if self.static:
                layer.cumulative_length.fill_(length)


@functools.lru_cache(maxsize=64)
def cache_argument(forward: Callable[..., object]) -> str:
    """The name under which ``forward`` takes the KV cache: transformers 5.24 renamed ``past_key_values`` to
    ``cache``. Read once per forward function (a signature costs tens of microseconds, a decode builds two caches)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def resolve_layout(layout: str | None, compile: bool, device: torch.device, models: list[PreTrainedModel]) -> str:
    """The KV cache layout for ``models``: the one asked for, checked, or static on CUDA where every
    model supports it (no host syncs) and dynamic otherwise."""
    if layout not in (None, *LAYOUTS):
        raise SpeccascadeError(f"cache must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    unsupported = next((m for m in models if m.config.is_encoder_decoder or not _full_attention(m)), None)
    if layout is None:
        layout = "static" if device.type == "cuda" and unsupported is None else "dynamic"
    if layout == "static" and unsupported is not None:
        name = type(unsupported).__name__
        if unsupported.config.is_encoder_decoder:
            raise SpeccascadeError(f"{name}: encoder-decoder models run with the dynamic cache (cache='dynamic')")
        raise SpeccascadeError(f"{name} uses sliding-window attention, which the static cache cannot roll back; use cache='dynamic'")
    if compile and layout != "static":
        raise SpeccascadeError("compile needs the static cache (cache='static')")
    return layout


def takes_prepared_mask(model: PreTrainedModel) -> bool:
    """Whether the decoder may hand ``model`` its 4D boolean mask ready-made: SDPA attention (which reads one as
    is) over every earlier slot in every layer (a ready mask replaces transformers' per-layer-type masks)."""
    return model.config._attn_implementation == "sdpa" and _full_attention(model)


def _full_attention(model: PreTrainedModel) -> bool:
    """Every layer attends to all earlier slots: no sliding window or chunks (the static cache rolls back only
    such layers)."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return set(layer_types) == {"full_attention"}
    return not getattr(config, "sliding_window", None)


def sliding(model: PreTrainedModel) -> bool:
    """Some layers attend to a sliding window of slots, the others to all of them (Gemma 2 and 3, Mistral, Qwen2
    with its window on): the decoder keeps every slot in their caches and each row's slots side by side."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return "sliding_attention" in layer_types and set(layer_types) <= {"full_attention", "sliding_attention"}
    return bool(getattr(config, "sliding_window", None))
