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
        kinds = {m.config.is_encoder_decoder for m in (self.drafter, self.target)}
        if len(kinds) > 1:
            which = lambda m: "encoder-decoder" if m.config.is_encoder_decoder else "decoder-only"  # noqa: E731
            raise SpeccascadeError(
                f"a pair must be both decoder-only or both encoder-decoder: drafter {self.drafter_id!r} is "
                f"{which(self.drafter)}, target {self.target_id!r} is {which(self.target)}"
            )
        self.vocab_size = check_vocabularies(self)
        self.drafter.eval()
        self.target.eval()

    @property
    def is_encoder_decoder(self) -> bool:
        """T5-style pairs: each model encodes the source; decoding starts from the decoder start token."""
        return bool(self.target.config.is_encoder_decoder)

    @property
    def decoder_start_token_id(self) -> int:
        value = self.target.generation_config.decoder_start_token_id
        value = self.target.config.decoder_start_token_id if value is None else value
        return self.pad_token_id if value is None else int(value)

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
        if self.is_encoder_decoder:
            return None  # relative positions: no fixed limit on the decoded length
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

    def encode(self, prompts: Sequence[str | list[dict[str, str]]], chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise prompts, left-padded, through the chat template when the tokenizer has one.

        A prompt is one user message, or a conversation (chat messages ending with a user turn); without a
        template a conversation is its messages' texts, one paragraph each.
        """
        if self.tokenizer is None:
            raise SpeccascadeError(f"pair {self.name!r} has no tokenizer; pass token ids instead")
        tok = self.tokenizer
        messages = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        if chat and getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
            special = False  # the template already holds the special tokens
        else:
            texts, special = ["\n\n".join(turn["content"] for turn in m) for m in messages], True
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def teacher_forced(
        self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cont_ids: torch.Tensor,
        cont_mask: torch.Tensor, hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One forward of ``model`` over prompts and right-aligned continuations ``[B, W]``.

        Returns logits ``[B, W + 1, V]`` at the last W + 1 decoder positions (position i predicts
        continuation token i), their last hidden states, and the left-padded decoder ids. A
        decoder-only model reads prompt + continuation; an encoder-decoder model encodes the
        prompt and reads the decoder start token + continuation.
        """
        width = cont_ids.shape[1]
        if self.is_encoder_decoder:
            start = torch.full_like(cont_ids[:, :1], self.decoder_start_token_id)
            ids, mask = left_pad(torch.cat([start, cont_ids], 1), torch.cat([torch.ones_like(start), cont_mask], 1))
            out = model(input_ids=prompt_ids, attention_mask=prompt_mask, decoder_input_ids=ids,
                        decoder_attention_mask=mask, output_hidden_states=hidden)
            states = out.decoder_hidden_states[-1] if hidden else None
        else:
            ids, mask = left_pad(torch.cat([prompt_ids, cont_ids], 1), torch.cat([prompt_mask, cont_mask], 1))
            positions = (mask.cumsum(1) - 1).clamp_min(0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1,
                        output_hidden_states=hidden)
            states = out.hidden_states[-1] if hidden else None
        logits = out.logits[:, -width - 1 :, : self.vocab_size]
        return logits, None if states is None else states[:, -width - 1 :], ids

    def decode(self, token_ids: torch.Tensor | list[list[int]]) -> list[str]:
        """Decode rows of token ids (a tensor, or lists of different lengths), dropping special tokens."""
        if self.tokenizer is None:
            rows = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
            return [" ".join(map(str, row)) for row in rows]
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


def left_padded(sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one left-padded batch: ``ids`` and ``mask`` ``[B, longest]``, each row ending at the last column."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(sequences):
        ids[b, width - len(s) :], mask[b, width - len(s) :] = torch.tensor(list(s), dtype=torch.long), 1
    return ids.to(device), mask.to(device)


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
