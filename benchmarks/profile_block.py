"""Where exact speculative decoding's time goes outside the two models' forward passes (docs/profile.md).

    python benchmarks/profile_block.py --models tiny-random --batch-sizes 1,8
    python benchmarks/profile_block.py --models tiny-random --batch-sizes 1 --cache static --compile
    python benchmarks/profile_block.py --models tiny-random --prompts 2 --max-new-tokens 32 --layouts
    python benchmarks/profile_block.py --batch-sizes 1 --prompts 4 --counts --rule opt:0.5 --temperature 1

Decodes the bench's prompts (arithmetic test split, gamma 5) with exact speculative decoding (or the
cascade of ``--rule``; greedy unless ``--temperature``) and prints, per batch size:

- torch operators and host syncs (``.item()``, ``int()``, ``bool()`` of a tensor) per block outside
  the forwards, counted by a dispatch mode, and the operators per block by the speccascade function
  that runs them (exact counts: ``--counts`` prints only these);
- the split of a block's wall time into drafter forwards, the target forward and the rest (both models'
  forwards timed by ``ForwardClock``, nothing else attached; median of ``--repeats`` runs after a warm-up);
- the rest broken down by the function of speccascade that spends it (cProfile: each function's
  own time plus that of the torch calls it makes directly; cProfile slows Python calls, so read
  these as proportions).

``--layouts`` instead times the dynamic cache, the static cache and the static cache with compiled
decode steps side by side at batch 1 (taking turns, no hooks: ``torch.compile`` would trace them),
and checks that the three give the same tokens.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from speccascade.bench.measure import ForwardClock, batches
from speccascade.data.tasks import get_task
from speccascade.decoding import SpeculativeCascade, load_pair
from speccascade.deferral import rules


class OpCounter(TorchDispatchMode):
    """Counts torch operators, and host syncs (a tensor read on the host: ``.item()``, ``.tolist()``,
    ``int()``, ``bool()``), while ``clock`` is outside a forward."""

    READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")

    def __init__(self, clock: ForwardClock) -> None:
        super().__init__()
        self.clock, self.ops, self.syncs = clock, 0, 0
        self.by_function: Counter[str] = Counter()  # operators outside the forwards, by the speccascade function running them

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.clock.inside:
            self.ops += 1
            self.by_function[caller()] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.READS}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self.counted(method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def counted(self, method):
        def read(tensor, *args):
            self.syncs += not self.clock.inside
            return method(tensor, *args)
        return read


def caller() -> str:
    """The innermost speccascade function on the stack (``file:function``), which an operator is charged to."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "/speccascade/" in path:
            return f"{path.rsplit('/speccascade/', 1)[1]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def decode(decoder: SpeculativeCascade, ids: torch.Tensor, mask: torch.Tensor, size: int, new: int) -> int:
    """Decode every prompt in batches of ``size``; return the blocks run (one target forward each)."""
    return sum(decoder.generate(i, m, max_new_tokens=new).stats.target_forwards for i, m in batches(ids, mask, size))


def split(decoder, pair, ids, mask, size: int, new: int, repeats: int) -> dict[str, float]:
    """Median ms per block: wall, drafter forwards, target forward, the rest."""
    rounds = []
    with ForwardClock(pair) as clock:
        decode(decoder, ids, mask, size, new)  # warm-up
        for _ in range(repeats):
            clock.reset()
            began = time.perf_counter()
            blocks = decode(decoder, ids, mask, size, new)
            wall = time.perf_counter() - began
            rounds.append({"wall": wall, "drafter": clock.seconds["drafter"], "target": clock.seconds["target"], "blocks": blocks})
    median = min(rounds, key=lambda r: abs(r["wall"] - statistics.median(x["wall"] for x in rounds)))
    ms = {k: 1000 * median[k] / median["blocks"] for k in ("wall", "drafter", "target")}
    return ms | {"rest": ms["wall"] - ms["drafter"] - ms["target"], "blocks": median["blocks"]}


def counts(decoder, pair, ids, mask, size: int, new: int) -> tuple[float, float, dict[str, float]]:
    """Torch operators and host syncs per block outside the forwards, and the operators per block by function."""
    with ForwardClock(pair) as clock, OpCounter(clock) as counter:
        blocks = decode(decoder, ids, mask, size, new)
    by_function = {name: n / blocks for name, n in counter.by_function.most_common()}
    return counter.ops / blocks, counter.syncs / blocks, by_function


def breakdown(decoder, pair, ids, mask, size: int, new: int, top: int) -> list[tuple[str, float]]:
    """ms per block spent by each speccascade function outside the forwards (its own time and its direct torch calls)."""
    profile = cProfile.Profile()
    profile.enable()
    blocks = decode(decoder, ids, mask, size, new)
    profile.disable()
    stats = pstats.Stats(profile).stats
    spent: dict[str, float] = {}

    def ours(func) -> str | None:
        path, line, name = func
        return f"{os.path.relpath(path).removeprefix('speccascade/')}:{name}" if "/speccascade/" in path else None

    for func, (_, _, own, _, callers) in stats.items():
        if ours(func):
            spent[ours(func)] = spent.get(ours(func), 0.0) + own
        elif func[0] == "~":  # a built-in (torch operators): charged to the speccascade function calling it
            for caller, (_, _, tt, _) in callers.items():
                if ours(caller):
                    spent[ours(caller)] = spent.get(ours(caller), 0.0) + tt
    ranked = sorted(spent.items(), key=lambda kv: -kv[1])[:top]
    return [(name, 1000 * s / blocks) for name, s in ranked]


def layouts(pair, ids, mask, size: int, new: int, repeats: int, gamma: int) -> None:
    """ms per block of the dynamic cache, the static cache and compiled static decode steps, taking turns."""
    decoders = {name: SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=gamma, cache=cache, compile=compile)
                for name, cache, compile in (("dynamic", "dynamic", False), ("static", "static", False),
                                             ("static, compiled", "static", True))}
    tokens, seconds = {}, {name: [] for name in decoders}
    for name, decoder in decoders.items():
        began = time.perf_counter()
        tokens[name] = [decoder.generate(i, m, max_new_tokens=new).sequences for i, m in batches(ids, mask, size)]
        print(f"{name}: first decode {time.perf_counter() - began:.1f} s (compiling included)")
    same = all(torch.equal(a, b) for name in decoders for a, b in zip(tokens["dynamic"], tokens[name]))
    for _ in range(repeats):
        for name, decoder in decoders.items():
            began = time.perf_counter()
            blocks = decode(decoder, ids, mask, size, new)
            seconds[name].append(time.perf_counter() - began)
    base = statistics.median(seconds["dynamic"])
    for name in decoders:
        ms = 1000 * statistics.median(seconds[name]) / blocks
        print(f"{name}: {ms:.2f} ms per block, {statistics.median(seconds[name]) / base:.2f}x the dynamic cache's time")
    print(f"same tokens: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-random")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=None, help="dynamic or static (default: the decoder's)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--top", type=int, default=12, help="functions listed in the breakdown")
    parser.add_argument("--layouts", action="store_true", help="time dynamic, static and compiled static side by side")
    parser.add_argument("--rule", default="always", help="the deferral rule (always: exact SD), as --rules spells it")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--counts", action="store_true", help="only the operator and host-read counts (no timing)")
    args = parser.parse_args()
    pair = load_pair(args.models)
    ids, mask = pair.encode([e.prompt for e in get_task("arithmetic").examples("test", limit=args.prompts)])
    if args.layouts:
        return layouts(pair, ids, mask, 1, args.max_new_tokens, args.repeats, args.block_size)
    rule = rules.parse(args.rule, setting="--rule").build()
    decoder = SpeculativeCascade(pair, rule, block_size=args.block_size, temperature=args.temperature, cache=args.cache,
                                 compile=args.compile)
    print(f"{args.models}, rule {rule.spec}, T {args.temperature:g}, gamma {args.block_size}, cache {decoder.cache}, "
          f"compile {args.compile}, {args.prompts} prompts x {args.max_new_tokens} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for size in [int(s) for s in args.batch_sizes.split(",")]:
        started = time.perf_counter()
        ops, syncs, by_function = counts(decoder, pair, ids, mask, size, args.max_new_tokens)
        print(f"\nbatch {size}: per block outside forwards: {ops:.1f} torch ops, {syncs:.2f} host syncs; ops by function: "
              + ", ".join(f"{name} {n:.1f}" for name, n in list(by_function.items())[: args.top]))
        if args.counts:
            continue
        ms = split(decoder, pair, ids, mask, size, args.max_new_tokens, args.repeats)
        print(f"{ms['blocks']} blocks; ms per block: wall {ms['wall']:.3f}, drafter forwards {ms['drafter']:.3f}, "
              f"target forward {ms['target']:.3f}, rest {ms['rest']:.3f} (share outside forwards {ms['rest'] / ms['wall']:.3f})")
        for name, value in breakdown(decoder, pair, ids, mask, size, args.max_new_tokens, args.top):
            print(f"  {value:7.3f} ms  {name}")
        print(f"  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
