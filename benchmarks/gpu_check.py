"""One-shot CUDA check of the decoder: bf16 agreement with the target, the KV cache layouts, the packaged
bench, and decode speed side by side.

Run where a CUDA GPU exists, with the package installed: ``python benchmarks/gpu_check.py [--out FILE.json]``.
Reports (a) how often exact speculative decoding in bf16 reproduces the target's own bf16 greedy tokens
(float32 equality is proven by the tests; bf16 verification of a block and single-token decoding
run different kernels, so near-ties may flip), (b) whether the dynamic cache (its slot count on the
host), the static cache (on the device) and compiled decode steps give the same float32 tokens, for a
decoder-only and an encoder-decoder pair, (c) whether learned heads decode on the device, (d) a tiny
``speccascade bench`` run (static cache, compiled) and whether its exact configurations emitted the
same tokens, and (e) tokens/s of the target alone, exact speculative decoding and the never-defer
cascade on a mid-sized random Llama pair, batch 1 and 8, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from speccascade import Autoregressive, SpeculativeCascade, rules
from speccascade.bench import bench
from speccascade.decoding import ModelPair, layer_subset, tiny_random_pair, tiny_random_t5_pair


def agreement_bf16(device: str) -> float:
    pair = tiny_random_pair(seed=0, device=device, dtype=torch.bfloat16)
    ids, mask = pair.encode(["hello world", "a", "the quick brown fox", "1 + 1 =", "xyz", "abc def", "q", "zz top"], chat=False)
    target = Autoregressive(pair, "target").generate(ids, mask, max_new_tokens=64).new_tokens
    spec = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4).generate(ids, mask, max_new_tokens=64).new_tokens
    first_diff = [(t != s).int().argmax().item() if (t != s).any() else t.numel() for t, s in zip(target, spec)]
    return sum(first_diff) / target.numel()  # fraction of tokens before each row's first divergence


def layouts_agree(device: str) -> dict[str, bool]:
    """float32 tokens of the dynamic cache equal the static cache's (and the compiled steps') on ``device``."""
    pair, t5 = tiny_random_pair(seed=0, device=device), tiny_random_t5_pair(seed=0, device=device)
    ids, mask = pair.encode(["hello world", "a", "the quick brown fox jumps", "1 + 1 ="], chat=False)
    checks = {}
    for rule in (rules.AlwaysDefer(), rules.OPT(alpha=0.3)):
        dynamic = SpeculativeCascade(pair, rule, block_size=4, temperature=1.0, cache="dynamic").generate(ids, mask, 24, seed=1)
        for name, options in (("static", {}), ("compiled", {"compile": True}))[: 2 if device == "cuda" else 1]:
            other = SpeculativeCascade(pair, rule, block_size=4, temperature=1.0, cache="static", **options).generate(ids, mask, 24, seed=1)
            checks[f"{rule.name}_{name}_equals_dynamic"] = bool(torch.equal(dynamic.sequences, other.sequences))
    source, source_mask = t5.encode(["hello world", "the quick brown fox jumps over"])
    greedy = t5.target.generate(input_ids=source, attention_mask=source_mask, max_new_tokens=16, do_sample=False)
    out = SpeculativeCascade(t5, rules.AlwaysDefer(), block_size=4).generate(source, source_mask, 16)
    checks["t5_forced_defer_equals_generate"] = bool(torch.equal(out.sequences, greedy[:, : out.sequences.shape[1]]))
    return checks


def bench_on_device(device: str) -> dict:
    """The packaged ``speccascade bench`` on tiny-random; its exact configurations must emit the same tokens."""
    with tempfile.TemporaryDirectory() as out:
        report = bench(out, models="tiny-random", batch_sizes="1,2", prompts=2, max_new_tokens=8, repeats=1,
                       cache="static", compile=device == "cuda", device=device)
    exact = {r["new_tokens"] for r in report["results"]
             if r["name"] in ("target, generate", "assisted generation", "target alone", "exact speculative decoding")}
    return {"exact_configurations_agree": len(exact) == 1, "goals": {k: g["value"] for k, g in report["goals"].items()}}


def learned_on_device(device: str) -> dict[str, bool]:
    """A position-level and a token-level learned head decode on ``device``; forced to r = 1 they are exact SD."""
    from speccascade.deferral import features as F
    from speccascade.deferral.heads import DeferralHead

    pair = tiny_random_pair(seed=0, device=device)
    ids, mask = pair.encode(["hello world", "a", "the quick brown fox"], chat=False)
    exact = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4).generate(ids, mask, max_new_tokens=24).sequences
    checks = {}
    for name, features in (("position", list(F.POSITION_FEATURES)), ("token", list(F.POSITION_FEATURES + F.TOKEN_FEATURES))):
        torch.manual_seed(0)
        head = DeferralHead(features, mean=[0.0] * len(features), std=[1.0] * len(features))
        out = SpeculativeCascade(pair, rules.Learned(head, 0.5), block_size=4, temperature=1.0).generate(ids, mask, max_new_tokens=24)
        forced = SpeculativeCascade(pair, rules.Learned(head, rules.Learned.EXACT), block_size=4).generate(ids, mask, max_new_tokens=24)
        checks[f"{name}_head_decodes"] = out.stats.new_tokens == 3 * 24
        checks[f"{name}_head_forced_is_exact"] = bool(torch.equal(forced.sequences, exact))
    return checks


def mid_pair(device: str, dtype: torch.dtype, small: bool) -> ModelPair:
    hidden, layers = (64, 4) if small else (2048, 16)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=16 if not small else 4, num_key_value_heads=4 if not small else 2,
                         max_position_embeddings=4096, eos_token_id=None)
    torch.manual_seed(0)
    target = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    drafter = layer_subset(target, range(layers // 4))
    return ModelPair(drafter, target, None, "mid-random", f"layers 0-{layers // 4 - 1}", f"{layers}-layer random")


def speed(pair: ModelPair, batch: int, new_tokens: int) -> dict[str, float]:
    ids = torch.randint(0, 32000, (batch, 64), device=pair.device)
    decoders = {
        "target": Autoregressive(pair, "target"),
        "speculative (always)": SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4),
        "cascade (never)": SpeculativeCascade(pair, rules.NeverDefer(), block_size=4),
    }
    result = {}
    for name, dec in decoders.items():
        dec.generate(ids, max_new_tokens=8)  # warm-up
        if pair.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = dec.generate(ids, max_new_tokens=new_tokens)
        if pair.device.type == "cuda":
            torch.cuda.synchronize()
        result[name] = {"tokens_per_s": batch * new_tokens / (time.perf_counter() - start),
                        "tokens_per_target_call": out.stats.tokens_per_target_call}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke run)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "bf16_agreement": agreement_bf16(device), "layouts": layouts_agree(device), "learned": learned_on_device(device),
              "bench": bench_on_device(device)}
    pair = mid_pair(device, torch.bfloat16 if device == "cuda" else torch.float32, args.small)
    report["speed"] = {f"batch {b}": speed(pair, b, 32 if args.small else 128) for b in (1, 8)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
