"""A drafter with int8 weights (``load_pair(..., drafter_quantize="int8")``): its linear layers that do not narrow
their input are quantised copies, its logits stay near the float32 drafter's, the target is untouched (also when the drafter is a layer
subset that shares the target's layers), and speculative decoding stays exact (greedy token for token;
sampled in distribution). CPU only: the quantised kernels have no CUDA implementation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.ao.nn.quantized import dynamic as qdynamic

from speccascade import Autoregressive, SpeculativeCascade, rules
from speccascade.cli import main
from speccascade.decoding import layer_subset, load_pair, tiny_random_pair
from speccascade.decoding.quantize import quantize_drafter
from speccascade.errors import SpeccascadeError
from tests.conftest import DEVICE
from tests.decoding.test_distribution import GAMMA, V, chi_square_p, empirical_joint, target_joint

CPU = "cpu"


@pytest.fixture(scope="module")
def pairs():
    return load_pair("tiny-random", device=CPU), load_pair("tiny-random", drafter_quantize="int8", device=CPU)


@pytest.fixture(scope="module")
def prompts(pairs):
    return pairs[0].encode(["12 + 7 =", "What is 3 times 4?", "9 - 2"])


def test_the_quantised_drafter_has_int8_linear_layers_and_nearby_logits(pairs, prompts):
    full, quantised = pairs
    ids, mask = prompts
    kinds = {name: type(m) for name, m in quantised.drafter.named_modules() if isinstance(m, (qdynamic.Linear, torch.nn.Linear))}
    shapes = {name: (m.in_features, m.out_features) for name, m in full.drafter.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds.keys() == shapes.keys()
    # int8 where a layer keeps or widens its width; float32 where it narrows it (the MLP's down projection)
    assert {name for name, kind in kinds.items() if kind is qdynamic.Linear} == {n for n, (i, o) in shapes.items() if i <= o}
    assert any(kind is torch.nn.Linear and "down_proj" in name for name, kind in kinds.items())
    assert any(kind is qdynamic.Linear and "up_proj" in name for name, kind in kinds.items())
    assert quantised.drafter_id.endswith("(int8 weights)")
    with torch.no_grad():
        q_full, q_int8 = (p.drafter(ids, attention_mask=mask).logits.float() for p in pairs)
        assert not torch.equal(q_full, q_int8)  # it did quantise
        q_full, q_int8 = q_full[mask.bool()], q_int8[mask.bool()]
        assert torch.nn.functional.cosine_similarity(q_full, q_int8, -1).min() > 0.98
        assert (q_full.softmax(-1) - q_int8.softmax(-1)).abs().sum(-1).max() / 2 < 0.15  # total variation
        assert (q_full.argmax(-1) == q_int8.argmax(-1)).float().mean() > 0.9
        assert torch.equal(quantised.target(ids, attention_mask=mask).logits, full.target(ids, attention_mask=mask).logits)


def test_a_layer_subset_drafter_is_quantised_as_a_copy_and_the_target_keeps_its_weights():
    target = load_pair("tiny-random", device=CPU).target
    before = {k: v.clone() for k, v in target.state_dict().items()}
    quantised = quantize_drafter(layer_subset(target, [0]), "int8")
    assert any(isinstance(m, qdynamic.Linear) for m in quantised.modules())
    assert not any(isinstance(m, qdynamic.Linear) for m in target.modules())
    assert before.keys() == target.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("rule", [rules.AlwaysDefer(), rules.Chow(alpha=0.0), rules.TokenV3(alpha=0.0)], ids=repr)
def test_forced_defer_with_a_quantised_drafter_is_the_target_token_for_token(pairs, prompts, rule):
    full, quantised = pairs
    ids, mask = prompts
    target = Autoregressive(full, "target").generate(ids, mask, max_new_tokens=16).new_tokens
    exact = SpeculativeCascade(quantised, rule, block_size=4).generate(ids, mask, max_new_tokens=16).new_tokens
    assert torch.equal(exact, target)


@pytest.mark.skipif(DEVICE != CPU, reason="the distribution helpers decode on the test device; int8 drafters run on the CPU")
def test_forced_defer_with_a_quantised_drafter_emits_the_target_distribution():
    small = tiny_random_pair(seed=5, vocab_size=V, device=CPU)
    quantised = copy.copy(small)
    quantised.drafter = quantize_drafter(small.drafter, "int8")
    dec = SpeculativeCascade(quantised, rules.AlwaysDefer(), block_size=GAMMA, temperature=1.0)
    assert chi_square_p(empirical_joint(dec), target_joint(small, dec.sampler)) > 1e-3


def test_bad_quantisation_settings_are_refused(tmp_path, capsys):
    assert main(["log-traces", "--out", str(tmp_path / "x"), "--models", "tiny-random", "--drafter-quantize", "int4"]) == 2
    assert capsys.readouterr().err.strip() == "error: --drafter-quantize must be one of int8, got 'int4'"
    assert not (tmp_path / "x").exists()
    with pytest.raises(SpeccascadeError, match="needs a float32 drafter, got bfloat16"):
        load_pair("tiny-random", drafter_quantize="int8", device=CPU, dtype="bfloat16")
    if torch.cuda.is_available():
        with pytest.raises(SpeccascadeError, match="runs on the CPU only"):
            load_pair("tiny-random", drafter_quantize="int8", device="cuda")


def test_bench_times_the_quantised_drafter_and_exact_decoding_keeps_the_target_tokens(tmp_path):
    from speccascade.bench import bench

    report = bench(tmp_path, models="tiny-random", drafter_quantize="int8", batch_sizes="1", prompts=2, max_new_tokens=6,
                   repeats=1, device=CPU)
    rows = {r["name"]: r for r in report["results"]}
    assert report["drafter"].endswith("(int8 weights)")
    assert rows["exact speculative decoding"]["new_tokens"] == rows["target alone"]["new_tokens"]
