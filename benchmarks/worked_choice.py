"""Issue 24's choices from the validation labels (docs/plan-worked.md, step 4 and amendments 1-3), as a rule
that is written down before the test is decoded: which knob each rule takes, which rule is the best
training-free one, which head goes to the test, and the test's and the secondary comparison's rule lists.

Reads ``outcome_knobs.py``'s report (run with ``--allowed 1`` and ``--accepted 800`` over the six rules and
the outcome heads) and ``outcome_curve.py``'s (the heads' validation AUROC, which breaks a tie between heads):

    python benchmarks/worked_choice.py runs/worked/knobs.json runs/worked/curve.json > runs/worked/choice.json

- A rule's knob is its most accepting cut with at most 1 harmful validation mismatch; a rule with no such cut
  takes exact decoding's place (``always``).
- The best training-free rule accepts the most validation mismatches at its knob among Gain, the KL judge,
  Entropy and FLy (a tie goes to the one named first in that list).
- The learned head accepts the most among the outcome heads (a tie goes to the higher validation AUROC).
- The secondary comparison (amendment 3) takes both at the cut accepting 800 validation mismatches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAINING_FREE = ("gain", "kl", "entropy", "fly")
PAPER = ("diff", "tokenv3")
BUDGET, EQUAL_ACCEPTANCE = "1", "800"


def at_budget(report: dict, name: str) -> tuple[str, int]:
    """The rule's spelling at its knob (``always`` where none keeps the budget) and the mismatches it accepts."""
    found = report["rules"][name][BUDGET]
    return found["spec"] or "always", found["accepted"]


def choose(knobs: dict, curve: dict) -> dict:
    """The plan's choices from the two reports (see the module docstring)."""
    missing = [name for name in (*TRAINING_FREE, *PAPER) if name not in knobs["rules"]]
    heads = [name for name in knobs["rules"] if name.startswith("learned:")]
    if missing or not heads:
        raise SystemExit(f"error: the knobs report lacks {', '.join(missing) or 'any learned: head'}")
    rules = {name: at_budget(knobs, name)[0] for name in (*TRAINING_FREE, *PAPER)}
    best = max(TRAINING_FREE, key=lambda name: (at_budget(knobs, name)[1], -TRAINING_FREE.index(name)))
    head = max(heads, key=lambda name: (at_budget(knobs, name)[1], curve[name]["estimate"]))
    head_spec = at_budget(knobs, head)[0]
    equal = {name: knobs["rules"][name]["at_accepted"][EQUAL_ACCEPTANCE]["spec"] for name in (best, head)}
    if None in equal.values():
        raise SystemExit(f"error: {', '.join(n for n, spec in equal.items() if spec is None)} scores fewer than "
                         f"{EQUAL_ACCEPTANCE} validation mismatches finite: no cut accepts that many")
    return {"rules": rules, "best_training_free": {"name": best, "spec": rules[best]},
            "head": {"name": head, "spec": head_spec},
            "test_rules": ",".join(["target", "drafter", "always", *rules.values(), head_spec]),
            "secondary_rules": ",".join(["target", equal[head], equal[best]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("knobs", type=Path, help="outcome_knobs.py's JSON report (--allowed 1 --accepted 800)")
    parser.add_argument("curve", type=Path, help="outcome_curve.py's JSON report with the same heads")
    args = parser.parse_args()
    print(json.dumps(choose(json.loads(args.knobs.read_text()), json.loads(args.curve.read_text())), indent=2))


if __name__ == "__main__":
    main()
