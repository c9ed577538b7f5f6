"""How much could a quality-keeping cascade accept? The harmless share of mismatches, with intervals.

Reads on-policy traces logged with ``--labels outcome`` under ``--rule always`` (the replies are the
target's) and counts, per example, the examined positions where the draft differs from the target's
token. In replies the target gets right (score 1) a swap can only lose the answer; the share of
those mismatches whose ``outcome_harm`` is 0 is what a rule could accept there without loss. Every
rate is a ratio of per-example sums with its 95% bootstrap interval over examples
(``speccascade.uncertainty``).

    python benchmarks/outcome_share.py runs/traces/worked-outcome-s0 runs/traces/worked-outcome-s1

``--by-kind`` splits the mismatches of right replies into digit swaps (either token holds a digit, decoded
with the traces' target tokenizer) and all others, each with its harmless share.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
from transformers import AutoTokenizer

from speccascade.data import traces
from speccascade.uncertainty import ratio_interval, resample_weights


def examined_mismatch(columns) -> object:
    """Rows where the cascade examined a draft that differs from the target's token: the positions outcome labels
    decode (a pandas Series or a numpy array, as ``columns`` holds)."""
    return columns["examined"].astype(bool) & (columns["draft_token"] != columns["target_argmax"])


def per_example(directories: list[str], digits: np.ndarray | None = None) -> pd.DataFrame:
    """Per example: its score, examined positions, mismatches and harmful / helpful mismatches; with ``digits``
    (one flag per token id: its text holds a digit) also the digit swaps among the mismatches and the harmful."""
    columns = ["example_id", "examined", "draft_token", "target_argmax", "outcome_harm", "outcome_delta", "score"]
    frames = [traces.load_traces(d).select_columns(columns).to_pandas() for d in directories]
    rows = pd.concat([f.assign(example_id=f"{i}:" + f["example_id"]) for i, f in enumerate(frames)])  # ids per directory
    mismatch = examined_mismatch(rows)
    rows = rows.assign(examined=rows["examined"].astype(bool), mismatch=mismatch, harmful=mismatch & (rows["outcome_harm"] == 1),
                       helpful=mismatch & (rows["outcome_delta"] < 0))
    sums = dict(mismatches=("mismatch", "sum"), harmful=("harmful", "sum"), helpful=("helpful", "sum"))
    if digits is not None:
        digit = rows["mismatch"] & (digits[rows["draft_token"].to_numpy()] | digits[rows["target_argmax"].to_numpy()])
        rows = rows.assign(digit=digit, digit_harmful=digit & rows["harmful"])
        sums |= dict(digit_mismatches=("digit", "sum"), digit_harmful=("digit_harmful", "sum"))
    return rows.groupby("example_id").agg(score=("score", "first"), examined=("examined", "sum"), **sums)


def digit_tokens(tokenizer, size: int = 0) -> np.ndarray:
    """For every token id below ``max(size, len(tokenizer))`` (a model's vocabulary may be padded past the
    tokenizer's), whether its text holds a digit."""
    flags = np.zeros(max(size, len(tokenizer)), dtype=bool)
    flags[: len(tokenizer)] = [any(ch.isdigit() for ch in tokenizer.decode([i])) for i in range(len(tokenizer))]
    return flags


def summary(examples: pd.DataFrame, seed: int = 0) -> dict:
    """The shares with their intervals (right replies: score 1)."""
    weights = resample_weights(len(examples), seed=seed)
    right = (examples["score"] >= 1).to_numpy(float)
    mismatches, harmful = examples["mismatches"].to_numpy(float), examples["harmful"].to_numpy(float)
    harmless_right = (mismatches - harmful) * right
    return {
        "examples": len(examples), "target_right": int(right.sum()),
        "examined": int(examples["examined"].sum()), "mismatches": int(mismatches.sum()),
        "mismatches_in_right_replies": int((mismatches * right).sum()),
        "harmful_in_right_replies": int((harmful * right).sum()), "helpful": int(examples["helpful"].sum()),
        "mismatch_rate": ratio_interval(mismatches, examples["examined"].to_numpy(float), weights).as_dict(),
        "harmless_share_in_right_replies": ratio_interval(harmless_right, mismatches * right, weights).as_dict(),
        "harmless_share_all": ratio_interval(mismatches - harmful, mismatches, weights).as_dict(),
    } | (by_kind(examples, right, weights) if "digit_mismatches" in examples else {})


def by_kind(examples: pd.DataFrame, right: np.ndarray, weights: np.ndarray) -> dict:
    """The mismatches of right replies and their harmless share, digit swaps apart from the others."""
    digit, digit_harmful = (examples[c].to_numpy(float) * right for c in ("digit_mismatches", "digit_harmful"))
    mismatches, harmful = (examples[c].to_numpy(float) * right for c in ("mismatches", "harmful"))
    kinds = {"digit": (digit, digit_harmful), "other": (mismatches - digit, harmful - digit_harmful)}
    return {"by_kind_in_right_replies": {kind: {"mismatches": int(m.sum()), "harmful": int(h.sum()),
                                                "harmless_share": ratio_interval(m - h, m, weights).as_dict()}
                                         for kind, (m, h) in kinds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", help="trace directories logged with --labels outcome under --rule always")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--by-kind", action="store_true", help="digit swaps apart from the other mismatches")
    args = parser.parse_args()
    digits = None
    if args.by_kind:
        manifest = traces.read_manifest(args.traces[0])
        digits = digit_tokens(AutoTokenizer.from_pretrained(manifest["target"]), manifest.get("vocab_size", 0))
    print(json.dumps(summary(per_example(args.traces, digits), args.seed), indent=2))


if __name__ == "__main__":
    main()
