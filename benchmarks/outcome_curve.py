"""How well do deferral scores tell harmful mismatches from harmless ones, on held-out outcome labels?

For each head (``learned:DIR``) or training-free rule (``gain``, ``kl``, ``entropy``, ...), scores
every examined mismatch (draft != the target's token) of outcome-labelled traces and reports the
AUROC of the score against ``outcome_harm`` (defer where the score is high), with its 95% bootstrap
interval over examples (whole replies resampled, ``speccascade.uncertainty``). The learning curve
of issue 24 (docs/plan-worked.md, step 3) is this table for heads trained on more and more problems.

    python benchmarks/outcome_curve.py runs/traces/worked-outcome-val gain kl entropy learned:runs/heads/outcome-128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from speccascade.data import traces
from speccascade.deferral import rules as R
from speccascade.evaluation.compare import load_heads
from speccascade.uncertainty import percentile_interval, resample_weights

from outcome_share import examined_mismatch  # the one definition of a labelled mismatch (benchmarks/)


def mismatches(directory: str) -> tuple[object, np.ndarray, np.ndarray, np.ndarray]:
    """The traces, the indices of their examined mismatches, each one's example index and its label."""
    rows = traces.load_traces(directory)
    key = rows.select_columns(["example_id", "examined", "draft_token", "target_argmax", "outcome_harm"]).with_format("numpy")[:]
    keep = np.flatnonzero(examined_mismatch(key) & np.isfinite(key["outcome_harm"]))
    _, example = np.unique(key["example_id"][keep], return_inverse=True)
    return rows, keep, example, key["outcome_harm"][keep].astype(int)


def scores(rule: R.Rule, rows, keep: np.ndarray) -> np.ndarray:
    """The rule's deferral score (higher = defer) at the rows ``keep``, computed on every row: a block rule
    such as FLy reads the rows around a mismatch."""
    columns = rows.select_columns(list(dict.fromkeys(rule.columns))).with_format("torch")[:]
    score = rule.score({k: v.float() if v.is_floating_point() else v for k, v in columns.items()}).numpy()
    return score[keep]


def auroc(score: np.ndarray, harm: np.ndarray, example: np.ndarray, seed: int = 0) -> dict:
    """AUROC with its interval: each resample weighs a row by how often its example was drawn. The AUROC reads
    only the scores' order, so they are replaced by their ranks (a rule may score +inf: KL's strict positions)."""
    score = rankdata(score)
    weights = resample_weights(example.max() + 1, resamples=400, seed=seed)[:, example]
    replicates = np.array([roc_auc_score(harm, score, sample_weight=w) if harm[w > 0].min() != harm[w > 0].max()
                           else np.nan for w in weights])
    return percentile_interval(roc_auc_score(harm, score), replicates).as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", help="outcome-labelled traces (held out from every head)")
    parser.add_argument("rules", nargs="+", help="rule names (their score) or learned:DIR")
    args = parser.parse_args()
    rows, keep, example, harm = mismatches(args.traces)
    report = {"mismatches": int(len(harm)), "harmful": int(harm.sum()), "examples": int(example.max() + 1)}
    manifest = traces.read_manifest(args.traces)
    heads = load_heads([n.removeprefix("learned:") for n in args.rules if n.startswith("learned:")], manifest, args.traces)
    for name in args.rules:  # heads are checked against the traces (held out, readable) by compare's loader
        rule = heads[Path(name.removeprefix("learned:")).name] if name.startswith("learned:") else R.from_name(name)
        report[name] = auroc(scores(rule, rows, keep), harm, example)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
