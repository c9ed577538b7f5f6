"""Batch 8 / batch 1 throughput of exact speculative decoding with and without continuous batching (docs/profile.md).

    python benchmarks/continuous_batching.py --models tiny-random --prompts 32 --repeats 5
    python benchmarks/continuous_batching.py --models tiny-random --prompts 32 --repeats 5 --eos-every 47
    python benchmarks/continuous_batching.py --models smollm2-135m-worked --task worked-arithmetic --prompts 16 --max-new-tokens 160

Decodes a task's test prompts (default the bench's: arithmetic, gamma 5, greedy) three ways, taking turns on all of
them in every round (one warm-up round dropped), as ``speccascade bench`` times its rows: one prompt at a
time; in fixed batches of ``--batch-size``, each running until its longest reply ends (finished rows leave
it); and at ``--batch-size`` with finished rows' places taken by waiting prompts (``generate``'s
``batch_size``, continuous batching). Prints each one's tokens/s (median round), the ratios to batch 1,
and checks that the three decode the same tokens. The tiny-random target almost never ends a reply before
``--max-new-tokens``; ``--eos-every N`` makes every N-th token id an end of sequence, so its replies end at
different lengths, as a trained model's do.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from speccascade.bench.command import measure
from speccascade.bench.measure import Configuration
from speccascade import load_pair
from speccascade.data.tasks import get_task
from speccascade.decoding import SpeculativeCascade
from speccascade.deferral import rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-random")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--eos-every", type=int, default=None, help="every N-th token id ends a reply (from id 3)")
    args = parser.parse_args()
    pair = load_pair(args.models)
    if args.eos_every:
        pair.target.generation_config.eos_token_id = list(range(3, pair.vocab_size, args.eos_every))
    examples = get_task(args.task).examples("test", limit=args.prompts)
    ids, mask = pair.encode([e.prompt for e in examples])
    decoder = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=5)
    new, b = args.max_new_tokens, args.batch_size

    def run(batch_size: int | None):
        return lambda i, m: decoder.generate(i, m, max_new_tokens=new, batch_size=batch_size).stats

    configs = [Configuration("batch 1", "speccascade", 1, run(None)),
               Configuration(f"batch {b}, fixed batches", "speccascade", b, run(None)),
               Configuration(f"batch {b}, continuous", "speccascade", b, run(b), refills=True)]
    measure(configs, pair, ids, mask, args.repeats, chunk=ids.shape[0])
    rates = {c.name: c.stats.new_tokens / statistics.median(c.seconds) for c in configs}
    lengths = sorted(row["new_tokens"] for row in configs[0].stats.rows)
    print(f"{args.models} on {args.task}: {ids.shape[0]} prompts, up to {new} new tokens (replies {lengths[0]}-{lengths[-1]}, "
          f"median {lengths[len(lengths) // 2]}), median of {args.repeats} rounds, torch threads {torch.get_num_threads()}")
    print("| decoding | tokens/s | / batch 1 |\n|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / rates['batch 1']:.2f} |")
    replies = [decoder.in_batches(ids, mask, new, 0, 1), decoder.in_batches(ids, mask, new, 0, b),
               decoder.generate(ids, mask, max_new_tokens=new, batch_size=b)]
    print("same tokens:", all(torch.equal(out.new_tokens[:, :replies[0].new_tokens.shape[1]], replies[0].new_tokens)
                              for out in replies))

if __name__ == "__main__":
    main()
