"""One model's KV cache behind a small adapter: forward over new tokens, roll back by count.

The cache is transformers' ``DynamicCache``. Its ``crop`` takes a negative count in transformers
5.x (an absolute length in 4.x); the supported range is pinned in pyproject.toml and this module
is the only place that calls it. Batched rows share one slot layout: a slot that holds no token
of a row (left padding, or a draft the row rejected) is masked out by the decoder's 2D attention
mask, never zero-filled, and every row carries its own position ids.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel


class KVCache:
    """A growing KV cache for ``model`` with positional rollback."""

    def __init__(self, model: PreTrainedModel, vocab_size: int | None = None) -> None:
        self.model = model
        self.vocab_size = vocab_size  # logits are cut to the pair's shared vocabulary
        self.cache = DynamicCache(config=model.config)
        params = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache``
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def __len__(self) -> int:
        """Number of slots held (the same for every layer)."""
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append ``input_ids`` ``[B, n]``; return float32 logits ``[B, n, V]`` (and last hidden states).

        ``attention_mask`` ``[B, len(self) + n]`` covers every slot, old and new;
        ``logits_to_keep`` > 0 computes logits for that many last positions only.
        """
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            output_hidden_states=hidden_states,
            logits_to_keep=logits_to_keep,
            **{self._cache_arg: self.cache},
        )
        hidden = out.hidden_states[-1] if hidden_states else None
        logits = out.logits if self.vocab_size is None else out.logits[..., : self.vocab_size]
        return logits.float(), hidden

    def rollback(self, n: int) -> None:
        """Drop the newest ``n`` slots."""
        if n > 0:
            self.cache.crop(-n)
