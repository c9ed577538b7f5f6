"""algorithms.md section 6, limit 5: cached decoding equals uncached recomputation, and rollback
after rejections leaves each cache equal to a fresh prefill of the emitted prefix."""

from __future__ import annotations

import shutil

import pytest
import torch

from speccascade import SpeculativeCascade, rules
from speccascade.decoding.cache import KVCache
from tests.helpers import row, sliding_pair


def full_forward_probs(model, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Uncached forward over left-padded sequences, [B, S, V] probabilities."""
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(sequences, attention_mask=mask, position_ids=positions).logits.float().softmax(-1)


def test_cached_block_probabilities_equal_uncached_recomputation(pair, batch):
    ids, mask = batch
    events = []
    dec = SpeculativeCascade(pair, rules.OPT(alpha=0.3), block_size=4, temperature=1.0, hook=events.append)
    out = dec.generate(ids, mask, max_new_tokens=20, seed=11)
    full_mask = torch.cat([mask, torch.ones_like(out.new_tokens)], dim=1)
    length = ids.shape[1]
    for model_name, attr in (("target", "p"), ("drafter", "q")):
        reference = full_forward_probs(getattr(pair, model_name), out.sequences, full_mask)
        checked = 0
        for e in events:
            for b in torch.nonzero(e.active).flatten().tolist():
                j = int(e.out_index[b])
                # positions up to the first rejection saw only emitted tokens before them
                for t in range(min(int(e.n_accepted[b]), dec.block_size) + 1):
                    if j + t >= out.stats.rows[b]["new_tokens"]:
                        break
                    torch.testing.assert_close(getattr(e, attr)[b, t], reference[b, length + j + t - 1], atol=2e-5, rtol=1e-4)
                    checked += 1
        assert checked >= out.stats.new_tokens  # every emitted token's distribution was compared


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("rule", [rules.AlwaysDefer(), rules.OPT(alpha=rules.OPT.EXACT)], ids=["lagging-drafter", "full-drafter"])
def test_rollback_leaves_caches_equal_to_a_fresh_prefill(pair, batch, cache, rule):
    ids, mask = batch
    dec = SpeculativeCascade(pair, rule, block_size=4, temperature=1.0, cache=cache)
    state = dec.start(ids, mask, max_new_tokens=40, seed=2)
    for _ in range(5):
        dec.step(state)
    slots = int(state.slots.length)
    real = state.slots.mask.sum(1)
    assert bool((real < slots).any()), "some row must hold masked-out (rejected) slots"
    lag = state.slots.behind["drafter"]  # the full drafter skips its last step where it is run on demand
    assert state.slots.behind["target"] == 0 and dec.drafter_lag == (1 if isinstance(rule, rules.AlwaysDefer) else 0)
    assert lag == dec.drafter_lag or (dec.bonus_on_demand and lag == 1)
    for name, model in dec.models.items():
        held = slots - (lag if name == "drafter" else 0)  # a lagging drafter lacks the last slot
        layers = state.slots.caches[name].cache.layers
        assert len(state.slots.caches[name]) == held
        for b in range(ids.shape[0]):
            # the emitted prefix minus the pending token, which no cache holds yet
            n = int(state.out.emitted[b])
            prefix = torch.cat([row(ids, mask, b), state.out.tokens[b : b + 1, : n - 1]], dim=1)
            fresh = KVCache(model)
            with torch.inference_mode():
                fresh.forward(prefix, torch.arange(prefix.shape[1]).unsqueeze(0), torch.ones_like(prefix), logits_to_keep=1)
            fresh = fresh.cache
            keep = state.slots.mask[b, :held]
            for layer, fresh_layer in zip(layers, fresh.layers):
                got_keys, got_values = layer.keys[b][:, :held][:, keep], layer.values[b][:, :held][:, keep]
                fresh_keys, fresh_values = fresh_layer.keys[0], fresh_layer.values[0]
                if name == "drafter" and lag and bool(state.slots.mask[b, slots - 1]):
                    fresh_keys, fresh_values = fresh_keys[:, :-1], fresh_values[:, :-1]  # its last token is re-fed later
                torch.testing.assert_close(got_keys, fresh_keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(got_values, fresh_values, atol=1e-5, rtol=1e-4)
        assert torch.equal(state.slots.pos, real)  # the pending token's position = tokens already cached


def test_static_cache_and_compaction_decode_like_the_dynamic_cache(pair, batch):
    """The static cache (rollback on the device) and compaction (rejected slots squeezed out)
    give the dynamic cache's tokens, for lagging and full drafters."""
    ids, mask = batch
    for rule in (rules.AlwaysDefer(), rules.OPT(alpha=0.3)):
        reference = SpeculativeCascade(pair, rule, block_size=4, temperature=1.0).generate(ids, mask, 40, seed=3)
        static = SpeculativeCascade(pair, rule, block_size=4, temperature=1.0, cache="static")
        state = static.start(ids, mask, 40, seed=3)
        while not bool(state.out.done.all()):
            static.step(state)
            state.slots.compact()  # every step: rejected slots never accumulate
        assert torch.equal(state.finish().sequences, reference.sequences)
        assert torch.equal(static.generate(ids, mask, 40, seed=3).sequences, reference.sequences)


def test_lagging_drafter_runs_gamma_drafter_steps_per_block(pair, batch):
    """Exact speculative decoding skips the drafter step whose q nothing reads; cascades keep it."""
    ids, mask = batch
    for rule, per_block in ((rules.AlwaysDefer(), 4), (rules.OPT(alpha=0.3), 5)):
        out = SpeculativeCascade(pair, rule, block_size=4, temperature=1.0).generate(ids, mask, max_new_tokens=12)
        assert out.stats.drafter_forwards == per_block * out.stats.target_forwards


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(shutil.which("cc") is None, reason="inductor needs a C compiler")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_static_compiled_path_equals_the_eager_path(device):
    """The static cache with torch.compile'd decode steps gives the eager dynamic path's tokens, also where waiting
    prompts take finished rows' places in it (continuous batching, rows replaced in place)."""
    from speccascade.decoding import tiny_random_pair

    pair = tiny_random_pair(seed=0, device=device)
    pair.target.generation_config.eos_token_id = list(range(3, pair.vocab_size, 7))  # rows end at different steps
    ids, mask = pair.encode(["hello world", "a", "the quick brown fox jumps", "1 + 1 =", "x y", "so it goes"], chat=False)
    for rule in (rules.AlwaysDefer(), rules.OPT(alpha=0.3)):
        for temperature in (0.0, 1.0):
            options = dict(block_size=4, temperature=temperature)
            eager = SpeculativeCascade(pair, rule, cache="dynamic", **options).generate(ids, mask, 24, seed=1)
            fast = SpeculativeCascade(pair, rule, cache="static", compile=True, **options)
            assert torch.equal(eager.sequences, fast.generate(ids, mask, 24, seed=1).sequences), (rule, temperature)
            refilled = fast.generate(ids, mask, 24, seed=1, batch_size=4)
            assert torch.equal(eager.sequences, refilled.sequences), (rule, temperature, "refilled")


@pytest.mark.parametrize("cache, reads", [("dynamic", 1), ("static", 0)])
def test_a_block_reads_the_host_at_most_once(pair, batch, monkeypatch, cache, reads):
    """A block reads a tensor on the host once with the dynamic cache (the count its rollback crops, read with
    the tokens still to emit) and never with the static cache; the models' forwards never do (they get their
    4D mask ready-made, so transformers does not check the padded 2D mask on the host)."""
    ids, mask = batch
    dec = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4, temperature=0, cache=cache)
    state = dec.start(ids, mask, max_new_tokens=24)
    inside, seen, seen_inside = [], [], []

    def enter(*_) -> None:
        inside.append(1)

    def leave(*_) -> None:
        inside.pop()

    def counted(name: str, method):
        def read(tensor, *args):
            (seen_inside if inside else seen).append(name)
            return method(tensor, *args)
        return read

    handles = [h for m in dec.models.values() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    try:
        for _ in range(3):
            dec.step(state)
    finally:
        monkeypatch.undo()
        for handle in handles:
            handle.remove()
    assert not bool(state.out.done.any())  # three full blocks, every row still decoding
    assert len(seen) == 3 * reads, seen
    assert not seen_inside


@pytest.mark.parametrize("rule", [rules.AlwaysDefer(), rules.OPT(alpha=0.3)], ids=["exact", "cascade"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_one_unpadded_prompt_decodes_dense_with_one_host_read_per_block(pair, batch, monkeypatch, rule, temperature):
    """One unpadded prompt (dynamic cache) keeps no slot mask and gives the models no attention mask: a block's
    host reads are its rollback's and, in a cascade, the one that decides whether the drafter's last step runs
    (``bonus_on_demand``). The same prompt behind a padding token (masked, so not dense) decodes the same tokens
    with no more reads: the models get their 4D mask ready-made, so transformers does not check the 2D one on the
    host before each forward."""
    ids, mask = batch
    prompt = row(ids, mask, 0)
    padded = torch.cat([torch.zeros_like(prompt[:, :1]), prompt], 1)
    dec = SpeculativeCascade(pair, rule, block_size=4, temperature=temperature, cache="dynamic")
    reads = []

    def counted(method):
        def read(tensor, *args):
            reads.append(1)
            return method(tensor, *args)
        return read

    def blocks(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        state = dec.start(prompt_ids, prompt_mask, max_new_tokens=24, seed=3)
        reads.clear()
        for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        try:
            for _ in range(3):
                dec.step(state)
        finally:
            monkeypatch.undo()
        assert not bool(state.out.done.any())
        return state.out.new_tokens(), len(reads), state.slots.dense

    dense_tokens, dense_reads, dense = blocks(prompt, torch.ones_like(prompt))
    padded_mask = torch.ones_like(padded)
    padded_mask[:, 0] = 0
    masked_tokens, masked_reads, masked_dense = blocks(padded, padded_mask)
    assert dense and not masked_dense
    assert dense_reads == 3 * (1 + dec.bonus_on_demand) and dec.bonus_on_demand == (not isinstance(rule, rules.AlwaysDefer))
    assert masked_reads == dense_reads
    assert torch.equal(dense_tokens, masked_tokens)


def test_only_sdpa_models_attending_to_every_slot_get_a_ready_mask():
    """A ready-made 4D mask is read as is by SDPA alone, and replaces transformers' per-layer-type masks, so
    eager attention and sliding windows keep transformers' own mask building."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from speccascade.decoding.cache import takes_prepared_mask

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    assert takes_prepared_mask(LlamaForCausalLM(LlamaConfig(**small, attn_implementation="sdpa")))
    assert not takes_prepared_mask(LlamaForCausalLM(LlamaConfig(**small, attn_implementation="eager")))
    assert not takes_prepared_mask(MistralForCausalLM(MistralConfig(**small, sliding_window=8, attn_implementation="sdpa")))
    hybrid = Qwen2Config(**small, layer_types=["full_attention", "sliding_attention"], use_sliding_window=True,
                         sliding_window=8, attn_implementation="sdpa")
    assert not takes_prepared_mask(Qwen2ForCausalLM(hybrid))


@pytest.mark.parametrize("family", ["mistral", "qwen2 hybrid", "gemma3"])
def test_sliding_window_models_decode_past_their_window_as_their_own_generate(family):
    """Rolling back past a sliding window (transformers' sliding layers keep only the window, and refuse to crop) and
    batches whose rows hold holes (the window counts slots): every row decodes as the target's greedy generate."""
    from speccascade.decoding import Autoregressive

    pair = sliding_pair(family)
    prompts = [torch.randint(3, 64, (n,)).tolist() for n in (2, 6, 9)]
    new = 12  # prompt and reply run well past the window of 4
    alone = [pair.target.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(p):]
             for p in prompts]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for decoder in (SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3), Autoregressive(pair, "target")):
        out = decoder.generate(ids, mask, max_new_tokens=new)
        assert [row.tolist() for row in out.new_tokens] == [row.tolist() for row in alone]
    assert SpeculativeCascade(pair).generate(ids, mask, max_new_tokens=new).stats.rejections > 0  # rows held holes
