"""Each rule's knob for a harm budget, read off validation outcome labels (docs/plan-worked.md, amendment 1).

Under greedy decoding a rule's decision matters only where the draft differs from the target's token:
deferring there ends the block, accepting it saves the target's call but may lose the answer
(``outcome_harm``). On outcome-labelled traces of the target's own replies (``--rule always``), a cut
accepts the mismatches whose score is at most the cut; this script picks, for every rule and head, the
cut that accepts the most mismatches with at most ``--allowed`` harmful ones among them, and prints the
``evaluate`` spelling of the rule at that knob. It is an off-policy estimate (after an accepted
mismatch the reply changes); the held-out test decodes on-policy and decides.

    python benchmarks/outcome_knobs.py runs/traces/worked-outcome-val gain kl entropy fly learned:runs/heads/h --allowed 1

``--accepted N ...`` reads the same labels the other way round, at equal acceptance: the harmful mismatches
among each score's N lowest-scored ones (with intervals, and paired against ``--versus``) and the rule's
spelling at that cut; ``--first-harmful K`` lists the first K harmful mismatches in each score's order, with
the swapped tokens (what a score lets through first: a digit or something else).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from speccascade.data import traces
from speccascade.deferral import rules as R
from speccascade.evaluation.compare import load_heads
from speccascade.evaluation.operating_point import at_knob
from speccascade.uncertainty import percentile_interval, resample_weights

from outcome_curve import mismatches, scores  # one definition of the labelled mismatches and their scores


def budget_cuts(score: np.ndarray, harm: np.ndarray, allowed: int, weights: np.ndarray):
    """For each row of ``weights`` ``[R, N]`` (how often each mismatch counts: a bootstrap resample's draws of
    its example), the last distinct score ``values[k]`` whose cut keeps at most ``allowed`` harmful mismatches
    (``k = -1``: none does), and the accepted and harmful counts at every distinct score. The scores are
    sorted once for all rows; harm only grows with the cut, so the budget holds on a prefix."""
    finite = np.isfinite(score)
    order = np.argsort(score[finite], kind="stable")
    s, h, w = score[finite][order], harm[finite][order], weights[:, finite][:, order]
    values = np.unique(s)
    ends = np.searchsorted(s, values, side="right")  # rows accepted at each distinct score
    zero = np.zeros((len(w), 1))
    accepted = np.concatenate([zero, np.cumsum(w, 1)], 1)[:, ends]
    harmful = np.concatenate([zero, np.cumsum(h * w, 1)], 1)[:, ends]
    return values, (harmful <= allowed).sum(1) - 1, accepted, harmful


def most_accepting_cut(score: np.ndarray, harm: np.ndarray, allowed: int,
                       weight: np.ndarray | None = None) -> tuple[float, float, float]:
    """The cut (defer iff score > cut) accepting the most mismatches with at most ``allowed`` harmful ones,
    halfway to the next score so that float rounding in the decoder does not move a tie; and the accepted
    and harmful counts. ``-inf`` where even the lowest score brings more harm (nothing is accepted).
    ``weight``: how often each mismatch counts (default once)."""
    weight = np.ones(len(score)) if weight is None else weight
    values, k, accepted, harmful = budget_cuts(score, harm, allowed, weight[None])
    k = int(k[0])
    if k < 0:
        return -math.inf, 0, 0
    return cut_after(values, k), accepted[0, k], harmful[0, k]


def cut_after(values: np.ndarray, k: int) -> float:
    """The cut that accepts the distinct scores up to ``values[k]``: halfway to the next one, so that float rounding
    in the decoder does not move a tie."""
    return float(values[k]) if k + 1 == len(values) else float((values[k] + values[k + 1]) / 2)


def acceptance_cut(score: np.ndarray, n: int) -> float:
    """The cut accepting the ``n`` lowest-scored mismatches (at the first distinct score that reaches ``n``, a tie
    taken whole, as :func:`harm_at_acceptance` counts); ``-inf`` where fewer finite scores exist."""
    finite = np.sort(score[np.isfinite(score)])
    values = np.unique(finite)
    k = int((np.searchsorted(finite, values, side="right") < n).sum())
    return cut_after(values, k) if k < len(values) else -math.inf


def accepted_replicates(score: np.ndarray, harm: np.ndarray, allowed: int, weights: np.ndarray) -> np.ndarray:
    """The most mismatches accepted within the budget in each bootstrap resample (rows of ``weights``, one
    weight per mismatch): the cut is chosen again in every resample, so the interval includes the choice."""
    _, k, accepted, _ = budget_cuts(score, harm, allowed, weights)
    return np.where(k >= 0, accepted[np.arange(len(k)), np.maximum(k, 0)], 0.0)


def harm_at_acceptance(score: np.ndarray, harm: np.ndarray, counts: list[int], weights: np.ndarray) -> np.ndarray:
    """The harmful mismatches among the ``counts[j]`` lowest-scored ones, for each row of ``weights`` (as in
    :func:`budget_cuts`): ``[R, len(counts)]``. The cut is the first distinct score at which that many are
    accepted (a tie is taken whole); NaN where fewer finite scores exist."""
    _, _, accepted, harmful = budget_cuts(score, harm, 0, weights)
    out = np.full((len(weights), len(counts)), np.nan)
    for j, n in enumerate(counts):
        first = (accepted < n).sum(1)  # accepted grows along a row: the index of the first cut reaching n
        reached = first < accepted.shape[1]
        out[reached, j] = harmful[reached, first[reached]]
    return out


def first_harmful(score: np.ndarray, harm: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The first ``k`` harmful mismatches in the score's order (lowest score first, ties in row order), each as
    (rank, index)."""
    order = np.argsort(score, kind="stable")
    ranks = np.flatnonzero(harm[order] > 0)[:k]
    return [(int(r), int(order[r])) for r in ranks]


def spelled(name: str, rule: R.Rule, cut: float) -> str | None:
    """The ``evaluate`` spelling of the rule at the knob of ``cut`` (None: no knob accepts a mismatch)."""
    if cut == -math.inf:
        return None
    knob = rule.knob_of(cut)  # spelled in full: the knob lies between two scores that may differ in the 7th digit
    if name.startswith("learned:"):
        return f"{name}@{R.number_text(knob)}"
    return at_knob(rule, knob).spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", help="outcome-labelled traces of the validation problems (held out from every head)")
    parser.add_argument("rules", nargs="+", help="rule names (their score) or learned:DIR")
    parser.add_argument("--allowed", type=int, nargs="+", default=[1], help="harmful accepted mismatches allowed")
    parser.add_argument("--versus", help="a rule of RULES: every other one's accepted count minus its, paired")
    parser.add_argument("--accepted", type=int, nargs="*", default=[], help="harm among each score's N lowest-scored mismatches")
    parser.add_argument("--first-harmful", type=int, default=0, help="list the first K harmful mismatches of each score")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the problems (seed 0)")
    args = parser.parse_args()
    if args.versus and args.versus not in args.rules:
        parser.error(f"--versus {args.versus} is not one of the rules given")
    rows, keep, example, harm = mismatches(args.traces)
    examples = len(set(rows.select_columns(["example_id"])["example_id"]))  # every reply, with mismatches or not
    # each resample draws all the replies; those without a mismatch are the columns past the last one used
    weights = resample_weights(examples, resamples=args.resamples, seed=0)[:, example]
    report = {"examples": examples, "mismatches": int(len(harm)), "harmful": int(harm.sum()), "rules": {}}
    heads = load_heads([n.removeprefix("learned:") for n in args.rules if n.startswith("learned:")],
                       traces.read_manifest(args.traces), args.traces)
    replicates, at_accepted, tokenizer = {}, {}, None
    for name in args.rules:
        rule = heads[Path(name.removeprefix("learned:")).name] if name.startswith("learned:") else R.from_name(name)
        score = scores(rule, rows, keep)
        report["rules"][name] = {}
        if args.accepted:
            at_accepted[name] = rule, score, harm_at_acceptance(score, harm, args.accepted,
                                                                np.vstack([np.ones(len(harm)), weights]))
        if args.first_harmful:
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(traces.read_manifest(args.traces)["target"])
            report["rules"][name]["first_harmful"] = swapped(rows, keep, first_harmful(score, harm, args.first_harmful),
                                                             tokenizer)
        for allowed in args.allowed:
            cut, accepted, harmful = most_accepting_cut(score, harm, allowed)
            replicates[name, allowed] = accepted_replicates(score, harm, allowed, weights)
            report["rules"][name][str(allowed)] = {
                "spec": spelled(name, rule, cut), "accepted": int(accepted), "harmful": int(harmful),
                "accepted_interval": percentile_interval(accepted, replicates[name, allowed]).as_dict(),
                "accepted_share": accepted / len(harm), "harmless_accepted_share": (accepted - harmful) / (len(harm) - harm.sum())}
    for (name, allowed), reps in replicates.items():
        if args.versus and name != args.versus:
            base = report["rules"][args.versus][str(allowed)]["accepted"]
            difference = report["rules"][name][str(allowed)]["accepted"] - base
            report["rules"][name][str(allowed)]["versus"] = {
                "rule": args.versus, **percentile_interval(difference, reps - replicates[args.versus, allowed]).as_dict()}
    for name, (rule, score, counts) in at_accepted.items():  # row 0 of counts: the labels as drawn; then resamples
        found = report["rules"][name]["at_accepted"] = {}
        for j, n in enumerate(args.accepted):
            found[str(n)] = {"spec": spelled(name, rule, acceptance_cut(score, n)),
                             **percentile_interval(counts[0, j], counts[1:, j]).as_dict()}
            if args.versus and name != args.versus:
                difference = counts[:, j] - at_accepted[args.versus][2][:, j]
                found[str(n)]["versus"] = {"rule": args.versus,
                                           **percentile_interval(difference[0], difference[1:]).as_dict()}
    print(json.dumps(report, indent=2))


def swapped(rows, keep: np.ndarray, found: list[tuple[int, int]], tokenizer) -> list[dict]:
    """Each found mismatch (:func:`first_harmful`'s rank and index into ``keep``) as its rank, example, position
    and the two tokens as text, and its kind: ``digit`` where either token holds a digit, else ``other``."""
    columns = rows.select_columns(["example_id", "position", "draft_token", "target_argmax"])
    out = []
    for rank, i in found:
        row = columns[int(keep[i])]
        draft, target = (tokenizer.decode([row[c]]) for c in ("draft_token", "target_argmax"))
        kind = "digit" if any(ch.isdigit() for ch in draft + target) else "other"
        out.append({"rank": rank, "example_id": row["example_id"], "position": row["position"], "draft": draft,
                    "target": target, "kind": kind})
    return out


if __name__ == "__main__":
    main()
