"""Loading the model to fine-tune, making a standalone layer-subset drafter, LoRA, and exporting the result
as an ordinary Hugging Face directory."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..decoding.pairs import layer_subset
from ..decoding.presets import PRESETS
from ..decoding.presets import load_model as _load
from ..errors import SpeccascadeError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(name: str, device: str | torch.device = "cpu") -> tuple[PreTrainedModel, object, str]:
    """A decoder-only model in float32 (the master weights; bf16 comes from autocast), its tokenizer and id."""
    model, tokenizer, model_id = _load(name, device=device, dtype=torch.float32)
    if model.config.is_encoder_decoder:
        raise SpeccascadeError(f"finetune trains decoder-only models; {model_id!r} is encoder-decoder")
    if tokenizer is None:
        raise SpeccascadeError(f"model {model_id!r} has no tokenizer")
    return model, tokenizer, model_id


def check_model(name: str, flag: str) -> None:
    """Refuse a model ``finetune`` could not load (``--base``, ``--teacher``) before anything is written: one no preset,
    directory or cached hub id names, or an encoder-decoder one, read from its config alone (a tiny preset, built in
    code, and a recipe preset, refused until built, go through :func:`load_model` itself)."""
    spec = PRESETS.get(name)
    try:
        if spec is not None and (spec.recipe or spec.target.startswith("tiny-random")):
            load_model(name)
            return
        if spec is not None and spec.gguf_package:  # loaded from its package's GGUF file
            return
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec.target if spec else name)
        except (OSError, ValueError) as err:
            raise SpeccascadeError(f"cannot load model {name!r}: {(str(err).strip() or type(err).__name__).splitlines()[0]}") from None
        if config.is_encoder_decoder:
            raise SpeccascadeError(f"finetune trains decoder-only models; {name!r} is encoder-decoder")
    except SpeccascadeError as err:
        raise SpeccascadeError(f"{flag} {name}: {err}") from None


def check_layers(model: PreTrainedModel, layers: list[int] | None) -> None:
    total = model.config.get_text_config().num_hidden_layers
    if layers is not None and (not layers or any(not 0 <= i < total for i in layers) or len(set(layers)) != len(layers)):
        raise SpeccascadeError(f"layers must be distinct indices in [0, {total}), got {layers}")


def standalone_subset(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A model of ``layers`` of ``model`` with its own copy of the weights (embeddings and head included)."""
    check_layers(model, layers)
    return copy.deepcopy(layer_subset(model, layers))


def lora_wrap(model: PreTrainedModel, rank: int, alpha: float, dropout: float, targets: list[str] | None):
    """peft LoRA adapters on ``targets`` (default: every attention and MLP projection); the rest is frozen."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = list(targets or [t for t in LORA_TARGETS if t in names])
    missing = [t for t in targets if t not in names]
    if missing or not targets:
        raise SpeccascadeError(f"lora_targets {missing or targets} name no module of {type(model).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def export(model: torch.nn.Module, tokenizer, out: Path) -> None:
    """Save the weights (LoRA merged in), config, generation config and tokenizer into ``out``, atomically per file
    set: everything is written to a temporary directory beside it and moved in at the end."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.eval()
    tmp = out / ".export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for path in tmp.iterdir():
        path.replace(out / path.name)
    tmp.rmdir()
