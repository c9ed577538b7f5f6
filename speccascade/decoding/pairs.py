"""A drafter/target pair that shares one tokenizer, and the helpers that check and build it."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedModel

from ..errors import SpeccascadeError


@dataclass
class ModelPair:
    """Drafter and target that take the transformers forward signature, plus their shared tokenizer.

    ``vocab_size`` is the vocabulary both models score (the smaller logits width when one model's
    embedding is padded past the tokenizer); logits are cut to it.
    """

    drafter: PreTrainedModel
    target: PreTrainedModel
    tokenizer: object | None
    name: str
    drafter_id: str
    target_id: str
    vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.vocab_size = check_vocabularies(self)
        self.drafter.eval()
        self.target.eval()

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids: the target's generation config, plus the tokenizer's own."""
        ids = self.target.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        extra = getattr(self.tokenizer, "eos_token_id", None)
        return ids + [extra] if isinstance(extra, int) and extra not in ids else ids

    @property
    def pad_token_id(self) -> int:
        for source in (self.tokenizer, self.target.generation_config, self.target.config):
            value = getattr(source, "pad_token_id", None)
            if isinstance(value, int):
                return value
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    @property
    def context_length(self) -> int | None:
        lengths = [getattr(m.config, "max_position_embeddings", None) for m in (self.drafter, self.target)]
        lengths = [n for n in lengths if n]
        return min(lengths) if lengths else None

    @property
    def tokenizer_fingerprint(self) -> str:
        """A short hash of the tokenizer's vocabulary (traces and heads record it)."""
        if self.tokenizer is None:
            return f"vocab-{self.vocab_size}"
        vocab = sorted(self.tokenizer.get_vocab().items())
        return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]

    def encode(self, prompts: Sequence[str], chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise prompts, left-padded, through the chat template when the tokenizer has one."""
        if self.tokenizer is None:
            raise SpeccascadeError(f"pair {self.name!r} has no tokenizer; pass token ids instead")
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            texts = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
            special = False  # the template already holds the special tokens
        else:
            texts, special = list(prompts), True
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """Decode rows of token ids, dropping special tokens."""
        if self.tokenizer is None:
            return [" ".join(map(str, row)) for row in token_ids.tolist()]
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)


def check_vocabularies(pair: ModelPair) -> int:
    """The shared vocabulary size; refuses pairs whose vocabularies differ, naming both."""
    sizes = {"drafter": pair.drafter.config.get_text_config().vocab_size, "target": pair.target.config.get_text_config().vocab_size}
    if sizes["drafter"] == sizes["target"]:
        return sizes["target"]
    tokenizer_size = len(pair.tokenizer) if pair.tokenizer is not None else None
    if tokenizer_size is not None and min(sizes.values()) >= tokenizer_size:
        return min(sizes.values())  # same tokenizer, one embedding padded further (e.g. Qwen2.5)
    raise SpeccascadeError(
        f"vocabularies differ: drafter {pair.drafter_id!r} has {sizes['drafter']} tokens, "
        f"target {pair.target_id!r} has {sizes['target']}; a pair must share one tokenizer"
    )


def check_same_tokenizer(drafter_tokenizer, target_tokenizer, drafter_id: str, target_id: str) -> None:
    """Refuse two tokenizers whose vocabularies differ, naming both models."""
    if drafter_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise SpeccascadeError(
            f"vocabularies differ: drafter {drafter_id!r} has {len(drafter_tokenizer)} tokens, "
            f"target {target_id!r} has {len(target_tokenizer)}; a pair must share one tokenizer"
        )


def layer_subset(target: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A drafter made of some of ``target``'s decoder layers, sharing their weights (no copy).

    It is a model of the target's own class whose config lists only the kept layers, so every
    attention layer gets a fresh ``layer_idx`` and the drafter has its own compact KV cache.
    """
    config = target.config.get_text_config()
    total = config.num_hidden_layers
    layers = list(layers)
    if not layers or any(not 0 <= i < total for i in layers) or len(set(layers)) != len(layers):
        raise SpeccascadeError(f"drafter layers must be distinct indices in [0, {total}), got {layers}")
    stack_name = next(
        (name for name, m in target.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList) and len(m) == total),
        None,
    )
    if stack_name is None:
        raise SpeccascadeError(f"cannot find the decoder layer stack of {type(target).__name__}")
    sub_config = copy.deepcopy(target.config)
    sub_text = sub_config.get_text_config()
    sub_text.num_hidden_layers = len(layers)
    if getattr(sub_text, "layer_types", None):
        sub_text.layer_types = [sub_text.layer_types[i] for i in layers]

    renamed = {f"{stack_name}.{i}.": f"{stack_name}.{j}." for j, i in enumerate(layers)}

    def rename(key: str) -> str | None:
        if not key.startswith(stack_name + "."):
            return key
        prefix = ".".join(key.split(".")[: stack_name.count(".") + 2]) + "."
        return renamed[prefix] + key[len(prefix):] if prefix in renamed else None

    state = {new: t for key, t in target.state_dict(keep_vars=True).items() if (new := rename(key)) is not None}
    with torch.device("meta"):
        drafter = type(target)(sub_config)
    drafter.load_state_dict(state, strict=True, assign=True)
    old_names = {rename(name): name for name, _ in target.named_buffers()}
    for name, buffer in list(drafter.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (rotary tables) are not in the state dict
            module_name, _, attr = name.rpartition(".")
            drafter.get_submodule(module_name).register_buffer(attr, target.get_buffer(old_names[name]), persistent=False)
    drafter.generation_config = copy.deepcopy(target.generation_config)
    return drafter.eval()
