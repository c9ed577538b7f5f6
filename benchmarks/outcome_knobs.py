"""Each rule's knob for a harm budget, read off validation outcome labels (docs/plan-worked.md, amendment 1).

Under greedy decoding a rule's decision matters only where the draft differs from the target's token:
deferring there ends the block, accepting it saves the target's call but may lose the answer
(``outcome_harm``). On outcome-labelled traces of the target's own replies (``--rule always``), a cut
accepts the mismatches whose score is at most the cut; this script picks, for every rule and head, the
cut that accepts the most mismatches with at most ``--allowed`` harmful ones among them, and prints the
``evaluate`` spelling of the rule at that knob. It is an off-policy estimate (after an accepted
mismatch the reply changes); the held-out test decodes on-policy and decides.

    python benchmarks/outcome_knobs.py runs/traces/worked-outcome-val gain kl entropy fly learned:runs/heads/h --allowed 1
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from speccascade.data import traces
from speccascade.deferral import rules as R
from speccascade.evaluation.compare import load_heads
from speccascade.evaluation.operating_point import at_knob

from outcome_curve import mismatches, scores  # one definition of the labelled mismatches and their scores


def most_accepting_cut(score: np.ndarray, harm: np.ndarray, allowed: int) -> tuple[float, int, int]:
    """The cut (defer iff score > cut) accepting the most mismatches with at most ``allowed`` harmful ones,
    halfway to the next score so that float rounding in the decoder does not move a tie; and the accepted
    and harmful counts. ``-inf`` where even the lowest score brings more harm (nothing is accepted)."""
    finite = np.isfinite(score)
    order = np.argsort(score[finite], kind="stable")
    s, h = score[finite][order], harm[finite][order]
    values = np.unique(s)
    ends = np.searchsorted(s, values, side="right")  # accepted count at each distinct score
    harmful = np.concatenate([[0], np.cumsum(h)])[ends]
    within = np.flatnonzero(harmful <= allowed)
    if not len(within):
        return -math.inf, 0, 0
    k = within[-1]
    cut = float(values[k]) if k + 1 == len(values) else float((values[k] + values[k + 1]) / 2)
    return cut, int(ends[k]), int(harmful[k])


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
    args = parser.parse_args()
    rows, keep, example, harm = mismatches(args.traces)
    examples = len(set(rows.select_columns(["example_id"])["example_id"]))  # every reply, with mismatches or not
    report = {"examples": examples, "mismatches": int(len(harm)), "harmful": int(harm.sum()), "rules": {}}
    heads = load_heads([n.removeprefix("learned:") for n in args.rules if n.startswith("learned:")],
                       traces.read_manifest(args.traces), args.traces)
    for name in args.rules:
        rule = heads[Path(name.removeprefix("learned:")).name] if name.startswith("learned:") else R.from_name(name)
        score = scores(rule, rows, keep)
        report["rules"][name] = {}
        for allowed in args.allowed:
            cut, accepted, harmful = most_accepting_cut(score, harm, allowed)
            report["rules"][name][str(allowed)] = {
                "spec": spelled(name, rule, cut), "accepted": accepted, "harmful": harmful,
                "accepted_share": accepted / len(harm), "harmless_accepted_share": (accepted - harmful) / (len(harm) - harm.sum())}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
