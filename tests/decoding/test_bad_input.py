"""Bad input gets one clear error each (a SpeccascadeError naming the problem)."""

from __future__ import annotations

import pytest
import torch

from speccascade import SpeccascadeError, SpeculativeCascade, load_pair, rules
from speccascade.decoding import ModelPair, SequentialCascade
from speccascade.decoding.pairs import layer_subset
from speccascade.decoding.presets import tiny_llama


def test_mismatched_vocabularies_name_both_models():
    with pytest.raises(SpeccascadeError, match=r"drafter 'small-d' has 100 tokens, target 'big-t' has 120"):
        ModelPair(tiny_llama(1, 100, 0), tiny_llama(2, 120, 1), None, "x", "small-d", "big-t")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(SpeccascadeError, match=r"unknown preset 'gpt-5'.*tiny-random.*smollm2-135m"):
        load_pair("gpt-5")


@pytest.mark.parametrize("gamma", [0, -2])
def test_block_size_below_one(pair, gamma):
    with pytest.raises(SpeccascadeError, match="block_size"):
        SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=gamma)


def test_negative_temperature(pair):
    with pytest.raises(SpeccascadeError, match="temperature must be >= 0"):
        SpeculativeCascade(pair, rules.AlwaysDefer(), temperature=-0.5)


def test_empty_prompt(pair):
    dec = SpeculativeCascade(pair, rules.AlwaysDefer())
    with pytest.raises(SpeccascadeError, match="empty"):
        dec.generate(torch.zeros(1, 0, dtype=torch.long))
    ids = torch.tensor([[5, 6, 7], [0, 0, 0]])
    with pytest.raises(SpeccascadeError, match="prompt 1 is empty"):
        dec.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_prompt_longer_than_context(pair):
    dec = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4)
    context = pair.context_length
    with pytest.raises(SpeccascadeError, match=f"exceeds the models' context of {context} tokens"):
        dec.generate(torch.full((1, context + 1), 7), max_new_tokens=4)


def test_token_ids_outside_the_vocabulary(pair):
    with pytest.raises(SpeccascadeError, match="token ids must lie in"):
        SpeculativeCascade(pair).generate(torch.tensor([[1, 2, pair.vocab_size]]))


def test_bad_layer_subset(pair):
    with pytest.raises(SpeccascadeError, match="distinct indices in \\[0, 2\\)"):
        layer_subset(pair.target, [0, 5])


def test_sequential_cascade_refuses_rules_that_need_the_target(pair):
    with pytest.raises(SpeccascadeError, match="'opt' needs the target's distribution"):
        SequentialCascade(pair, rules.OPT(alpha=0.1))


def test_unknown_hub_model_fails_fast_offline():
    with pytest.raises(SpeccascadeError, match="cannot load model 'no-such-org/no-such-model'"):
        load_pair(target="no-such-org/no-such-model", drafter_layers=[0])
