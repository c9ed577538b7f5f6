"""Small helpers shared by tests."""

from __future__ import annotations

import torch


def row(ids: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Row ``b``'s real prompt tokens, unpadded, as a [1, n] batch."""
    return ids[b][mask[b].bool()].unsqueeze(0)


def sliding_pair(family: str = "mistral", seed: int = 0):
    """A pair of small random models of ``family`` (mistral, qwen2 hybrid, gemma3) whose attention sees 4 slots
    (in one layer of two, for the hybrids)."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    from speccascade.decoding import ModelPair

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, attn_implementation="sdpa")
    configs = {
        "mistral": lambda: MistralForCausalLM(MistralConfig(**small, sliding_window=4)),
        "qwen2 hybrid": lambda: Qwen2ForCausalLM(Qwen2Config(**small, layer_types=["full_attention", "sliding_attention"],
                                                             use_sliding_window=True, sliding_window=4)),
        "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**small, head_dim=8, sliding_window=4,
                                                             layer_types=["sliding_attention", "full_attention"])),
    }
    torch.manual_seed(seed)
    return ModelPair(configs[family](), configs[family](), None, f"sliding {family}", "drafter", "target")


def wandb_records(run_dir) -> list:
    """The records of an offline W&B run (its ``run-*.wandb`` file: LevelDB-style log blocks of protobuf records)."""
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    block, data = 32768, next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding up to the block's end
            pos += (block - pos % block) % block
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records
