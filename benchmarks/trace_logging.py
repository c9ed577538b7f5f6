"""Teacher-forced trace logging throughput against the two models' raw forward passes.

Both are measured side by side on the same batches in one run (interleaved repetitions, medians):
(a) one forward of the drafter and one of the target, exactly as log-traces calls them;
(b) log-traces' whole reference-mode batch step (those forwards, features, labels, host copy).
The ratio (b)/(a) in tokens per second is the logging efficiency; the goal is >= 0.8.

    python benchmarks/trace_logging.py --models smollm2-135m --examples 16 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from speccascade import load_pair
from speccascade.data.tasks import get_task
from speccascade.deferral import rules
from speccascade.tracing.log_traces import RowLogger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()

    pair = load_pair(args.models)
    task = get_task("arithmetic")
    examples = list(enumerate(task.examples("train", limit=args.examples)))
    config = {"mode": "reference", "max_reference_tokens": 256, "block_size": 5, "topk": 8, "hidden_states": "none"}
    logger = RowLogger(pair, task, config, rules.AlwaysDefer())
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]

    captured: list[tuple] = []
    originals = {m: m.forward for m in (pair.drafter, pair.target)}

    def recording(model):
        def forward(*a, **kw):
            captured.append((model, kw))
            return originals[model](*a, **kw)
        return forward

    for model in originals:  # record the exact forward calls of one logging pass
        model.forward = recording(model)
    for batch in batches:
        logger.rows(batch)
    for model, forward in originals.items():
        model.forward = forward
    tokens = sum(int(kw["attention_mask"][:, -kw["logits_to_keep"] + 1 :].sum()) for m, kw in captured if m is pair.target)

    def raw() -> None:
        with torch.inference_mode():
            for model, kw in captured:
                model(**kw)

    def logged() -> None:
        for batch in batches:
            logger.rows(batch)

    times = {"forward": [], "logging": []}
    for _ in range(args.repeats):
        for name, fn in (("forward", raw), ("logging", logged)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "models": args.models, "examples": args.examples, "tokens": tokens,
        "forward_tokens_per_s": tokens / med["forward"], "logging_tokens_per_s": tokens / med["logging"],
        "ratio": med["forward"] / med["logging"], "goal": 0.8,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
