"""``worked-arithmetic``: the arithmetic task's problems with worked solutions in the style of GSM8K.

The questions, splits, levels and answers are the arithmetic generator's (same seed, same
questions); only the reply differs. Each step is explained in a sentence (what is known, what is
computed and why, and the intermediate result, as ``a op b = c``), and the reply ends with the line
"The answer is N.". Problems of one or two steps also open with what is asked and sum up before
that line; longer ones use briefer step sentences, so that replies run 60-150 SmolLM2 tokens
(62-147 over 4,800 replies of seeds 0-3). Wording varies the way people's solutions do: several
sentence shapes per step, connectives, verbs, optional units, the operands of ``+`` and ``*`` in
either order, and the shop problems' two independent parts in either order. A problem's wording is
drawn from its own seeded stream, so one seed always gives the same replies.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from .arithmetic import Arithmetic, WordProblem, word_problems
from .base import Problem

EQUATION = re.compile(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+)\.")


@dataclass(frozen=True)
class Step:
    """How one computation is told: ``known`` (a clause restating what is known), ``result`` (a noun phrase
    naming what it gives) and ``unit`` (what the result counts). Placeholders: the scene's fields, and
    ``x1``, ``y1``, ``x2``, ... (the operands of each step, in the generator's order)."""

    known: str
    result: str
    unit: str = "{things}"


# per template: the quantity asked for (a noun phrase) and one Step per computation, in the generator's order
STORIES: dict[str, tuple[str, tuple[Step, ...]]] = {
    "gain": ("the number of {things} {name} has now", (
        Step("{name} starts with {x1} {things} and {gains} {y1} more", "the number of {things} {name} has now"),)),
    "loss": ("the number of {things} {name} has left", (
        Step("{name} has {x1} {things} and {loses} {y1} of them", "the number of {things} that are left"),)),
    "together": ("the number of {things} {name} and {other} have altogether", (
        Step("{name} has {x1} {things} and {other} has {y1}", "the total of both"),)),
    "compare": ("the number of extra {things} {name} has compared with {other}", (
        Step("{name} has {x1} {things} while {other} has {y1}", "the difference between the two"),)),
    "gain_then_loss": ("the number of {things} {name} has at the end", (
        Step("{name} starts with {x1} {things} and {gains} {y1} more", "the number of {things} before any go"),
        Step("{name} then {loses} {y2} of those {x2}", "the number of {things} that remain"))),
    "more_than": ("the number of {things} {name} and {other} have together", (
        Step("{other} has {y1} more {things} than {name}, who has {x1}", "the number of {things} {other} has"),
        Step("{name} has {x2} and {other} has {y2}", "the total for both of them"))),
    "box": ("the number of {things} in the box now", (
        Step("the box starts with {x1} {things} and {name} takes out {y1}", "the number of {things} still inside"),
        Step("{other} then puts in {y2} more", "the number of {things} in the box now"))),
    "three_days": ("the number of {things} {name} collects in the three days", (
        Step("{name} collects {x1} {things} on Monday and {y1} on Tuesday", "the count for the first two days"),
        Step("{name} collects another {y2} on Wednesday", "the count for all three days"))),
    "packs": ("the number of {things} {name} buys", (
        Step("{name} buys {x1} packs and each pack holds {y1} {things}", "the number of {things} bought"),)),
    "share": ("the number of {things} each friend gets", (
        Step("{name} has {x1} {things} to share equally among {y1} friends", "the share of each friend"),)),
    "bags": ("the number of bags {name} fills", (
        Step("{name} has {x1} {things} and each bag holds {y1}", "the number of full bags", "bags"),)),
    "shelves": ("the number of {things} on all the shelves", (
        Step("there are {x1} shelves and each one holds {y1} {things}", "the number of {things} in total"),)),
    "shop": ("the number of {things} the shop has now", (
        Step("the shop has {x1} {things} and sells {y1} in the morning", "what is left at noon"),
        Step("it sells {y2} more in the afternoon", "what is left in the evening"),
        Step("the shop gets {x3} boxes of {y3}", "the delivery"),
        Step("{x4} are left and {y4} arrive", "the total now"))),
    "crates": ("the number of {things} {name} has now", (
        Step("{name} packs {x1} crates with {y1} {things} in each", "the number of {things} packed"),
        Step("{name} {loses} {y2} of them", "the number of {things} kept"),
        Step("{name} {gains} {y3} more", "the number of {things} {name} has now"))),
    "times_as_many": ("the number of {things} {name} and {other} have altogether now", (
        Step("{other} has {x1} times as many {things} as {name}, who has {y1}", "the number of {things} {other} has"),
        Step("{other} {loses} {y2} of them", "the number of {things} {other} keeps"),
        Step("{name} still has {x3} and {other} has {y3}", "the total for both now"))),
    "boxes_shared": ("the number of {things} each friend gets", (
        Step("{name} buys {x1} boxes with {y1} {things} in each", "the number of {things} in the boxes"),
        Step("{name} also buys another {y2} {things}", "the number of {things} in all"),
        Step("the {x3} {things} are shared equally among {y3} friends", "the share of each friend"))),
}
INDEPENDENT = {"shop": (2,)}  # steps that need no earlier result and may be told first

OPENINGS = ("We need to find {goal}.", "The question asks for {goal}.", "Let's work out {goal}.",
            "We are looking for {goal}.", "The question wants us to work out {goal}.")
FIRST = ("", "First, ", "To start, ")
NEXT = ("Next, ", "Then ", "Now ")
LAST = ("Finally, ", "Last, ", "Lastly, ")
SHAPES = ("{known}, so we {verb} to find {result}: {equation}.",  # lower case: the sentence's start is raised
          "since {known}, we {verb}: {equation}, which is {result}.",
          "{known}. {Doing} gives {result}: {equation}.",
          "to find {result}, we {verb}, because {known}: {equation}.",
          "we know that {known}, so {result} is {equation}.",
          "{known}; {doing} gives {equation}, and that is {result}.")
BRIEF = ("{known}, so {result} is {equation}.",  # for problems of three or more steps: replies stay short
         "{known}: {equation}.", "{known}, which gives {equation}.", "{known}, so we get {equation}.")
LONG = 3  # steps from which a reply uses BRIEF shapes and neither opening nor closing sentence
VERBS = {  # (verb phrase, the same as a gerund) per operation, over the operands x, y as written
    "+": (("add {x} and {y}", "adding {x} and {y}"), ("add {y} to {x}", "adding {y} to {x}"), ("add them", "adding them")),
    "-": (("subtract {y} from {x}", "subtracting {y} from {x}"), ("take {y} away from {x}", "taking {y} away from {x}"),
          ("subtract", "subtracting")),
    "*": (("multiply {x} by {y}", "multiplying {x} by {y}"), ("multiply the two numbers", "multiplying the two numbers")),
    "/": (("divide {x} by {y}", "dividing {x} by {y}"), ("work out {x} divided by {y}", "working out {x} divided by {y}")),
}
CLOSINGS = ("So {goal} is {answer}.", "This means {goal} is {answer}.", "Therefore, {goal} is {answer}.",
            "That makes {goal} equal to {answer}.", "So we get {answer} for {goal}.")


def solve(problem: WordProblem, rng: random.Random) -> str:
    """A worked solution of ``problem``, its wording drawn from ``rng``."""
    goal, steps = STORIES[problem.kind]
    equations = [(int(a), op, int(b), int(c)) for a, op, b, c in EQUATION.findall(" ".join(problem.steps))]
    fields = {"name": problem.scene.name, "other": problem.scene.other, "things": problem.scene.things,
              "gains": problem.scene.gains, "loses": problem.scene.loses}
    for i, (a, _, b, _) in enumerate(equations, 1):
        fields.update({f"x{i}": a, f"y{i}": b})
    order = list(range(len(steps)))
    for i in INDEPENDENT.get(problem.kind, ()):
        if rng.random() < 0.5:
            order.insert(0, order.pop(i))
    goal = goal.format(**fields)
    shapes = BRIEF if len(steps) >= LONG else SHAPES
    told = [_step(steps[i], equations[i], fields, _connective(n, len(order), rng), rng.choice(shapes), rng)
            for n, i in enumerate(order)]
    if len(steps) < LONG:  # short problems: say first what is asked, and sum up at the end
        told = [rng.choice(OPENINGS).format(goal=goal), *told, rng.choice(CLOSINGS).format(goal=goal, answer=problem.answer)]
    return " ".join(told) + f"\nThe answer is {problem.answer}."


def _connective(n: int, steps: int, rng: random.Random) -> str:
    """The words that open the ``n``-th of ``steps`` step sentences."""
    if steps == 1:
        return ""
    return rng.choice(FIRST if n == 0 else LAST if n == steps - 1 else NEXT)


def _step(step: Step, equation: tuple[int, str, int, int], fields: dict[str, object], opening: str, shape: str,
          rng: random.Random) -> str:
    """One step's sentence: what is known, the operation and why, the equation and what its result is."""
    x, op, y, result = equation
    if op in "+*" and rng.random() < 0.5:
        x, y = y, x  # the maths allows either order
    verb, doing = rng.choice(VERBS[op])
    unit = step.unit.format(**fields)
    equation_text = f"{x} {op} {y} = {result}" + (f" {unit}" if rng.random() < 0.5 else "")
    sentence = shape.format(
        known=step.known.format(**fields), result=step.result.format(**fields), equation=equation_text,
        verb=verb.format(x=x, y=y), doing=doing.format(x=x, y=y), Doing=doing.format(x=x, y=y).capitalize())
    sentence = opening + sentence
    return sentence[0].upper() + sentence[1:]


def worked_problems(split: str, seed: int) -> Iterator[Problem]:
    """The arithmetic problems of ``split`` for ``seed``, each with its worked solution as the reference."""
    for i, problem in enumerate(word_problems(split, seed)):
        rng = random.Random(f"worked-arithmetic/{split}/{seed}/{i}")
        yield Problem(f"worked-arithmetic-{split}-{i:05d}", f"Question: {problem.question}", solve(problem, rng),
                      str(problem.answer))


class WorkedArithmetic(Arithmetic):
    """The arithmetic problems, answered with worked solutions in words (GSM8K style); exact match of the
    final number. Mismatches between two models' replies are then mostly wording, not arithmetic."""

    name = "worked-arithmetic"

    def problems(self, split: str, seed: int) -> Iterator[Problem]:
        return worked_problems(split, seed)
