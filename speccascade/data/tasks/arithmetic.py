"""``arithmetic``: the project's own word problems, generated on the fly, no data file needed.

Difficulty levels take turns (example ``i`` has level ``1 + i % 4``):
1. one addition or subtraction with numbers up to 20;
2. two additions/subtractions;
3. one multiplication or division;
4. three or four steps mixing all four operations, with numbers of up to three digits in the question.
Each split is its own stream seeded by split and seed, and a stable hash of the question text
decides which split a question may appear in, so splits never share a question.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count, islice

from ...errors import SpeccascadeError
from .. import metrics
from .base import STEP_BY_STEP, Problem, Task, assemble, check_counts

SPLITS = ("train", "validation", "test")
LEVELS = (1, 2, 3, 4)
DEFAULT_COUNT = 1000  # examples per split when no limit is given

NAMES = ("Tom", "Ana", "Raj", "Mei", "Sam", "Lena", "Omar", "Ivy", "Ben", "Zoe", "Kofi", "Nina", "Luis", "Hana")
THINGS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "beads")
GAINS = ("buys", "finds", "is given", "collects", "wins")
LOSSES = ("gives away", "loses", "sells", "donates", "trades away")


@dataclass(frozen=True)
class Scene:
    """Who and what a problem is about (the worked-solution task retells it)."""

    name: str
    other: str
    things: str
    gains: str
    loses: str


@dataclass(frozen=True)
class WordProblem:
    """A question, its worked steps (``"a op b = c."``, in order), the integer answer, and the template
    (``kind``, e.g. ``"gain"``) and ``scene`` it was written from."""

    question: str
    steps: tuple[str, ...]
    answer: int
    kind: str
    scene: Scene


class _Work:
    """Worked steps, written as they are computed, so that the text and the answer always agree."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.result = 0

    def __call__(self, a: int, op: str, b: int) -> int:
        assert op != "/" or a % b == 0, "divisions are exact by construction"
        self.result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        self.steps.append(f"{a} {op} {b} = {self.result}.")
        return self.result


Template = Callable[[random.Random, _Work, Scene], str]


def _gain(r: random.Random, w: _Work, s: Scene) -> str:
    a, b = r.randint(2, 20), r.randint(1, 9)
    w(a, "+", b)
    return f"{s.name} has {a} {s.things} and {s.gains} {b} more. How many {s.things} does {s.name} have now?"


def _loss(r: random.Random, w: _Work, s: Scene) -> str:
    b = r.randint(1, 9)
    a = b + r.randint(1, 11)
    w(a, "-", b)
    return f"{s.name} has {a} {s.things} and {s.loses} {b} of them. How many {s.things} does {s.name} have left?"


def _together(r: random.Random, w: _Work, s: Scene) -> str:
    a, b = r.randint(1, 20), r.randint(1, 20)
    w(a, "+", b)
    return f"{s.name} has {a} {s.things} and {s.other} has {b}. How many {s.things} do they have altogether?"


def _compare(r: random.Random, w: _Work, s: Scene) -> str:
    b = r.randint(1, 15)
    a = b + r.randint(1, 5)
    w(a, "-", b)
    return (f"{s.name} has {a} {s.things} and {s.other} has {b}. "
            f"How many more {s.things} does {s.name} have than {s.other}?")


def _gain_then_loss(r: random.Random, w: _Work, s: Scene) -> str:
    a, b, c = r.randint(10, 40), r.randint(2, 20), r.randint(1, 9)
    w(w(a, "+", b), "-", c)
    return (f"{s.name} has {a} {s.things}, {s.gains} {b} more and then {s.loses} {c}. "
            f"How many {s.things} does {s.name} have now?")


def _more_than(r: random.Random, w: _Work, s: Scene) -> str:
    a, b = r.randint(3, 30), r.randint(2, 15)
    w(a, "+", w(a, "+", b))
    return (f"{s.name} has {a} {s.things}. {s.other} has {b} more than {s.name}. "
            f"How many {s.things} do they have altogether?")


def _box(r: random.Random, w: _Work, s: Scene) -> str:
    a, b, c = r.randint(15, 40), r.randint(2, 14), r.randint(2, 20)
    w(w(a, "-", b), "+", c)
    return (f"A box holds {a} {s.things}. {s.name} takes out {b} and {s.other} puts in {c}. "
            f"How many {s.things} are in the box now?")


def _three_days(r: random.Random, w: _Work, s: Scene) -> str:
    a, b, c = r.randint(2, 20), r.randint(2, 20), r.randint(2, 20)
    w(w(a, "+", b), "+", c)
    return (f"{s.name} collects {a} {s.things} on Monday, {b} on Tuesday and {c} on Wednesday. "
            f"How many {s.things} does {s.name} collect in the three days?")


def _packs(r: random.Random, w: _Work, s: Scene) -> str:
    k, n = r.randint(2, 12), r.randint(2, 12)
    w(k, "*", n)
    return f"{s.name} buys {k} packs of {s.things} with {n} in each pack. How many {s.things} does {s.name} buy?"


def _share(r: random.Random, w: _Work, s: Scene) -> str:
    k, n = r.randint(2, 12), r.randint(2, 12)
    w(k * n, "/", k)
    return f"{s.name} shares {k * n} {s.things} equally among {k} friends. How many {s.things} does each friend get?"


def _bags(r: random.Random, w: _Work, s: Scene) -> str:
    k, n = r.randint(2, 12), r.randint(2, 12)
    w(k * n, "/", n)
    return f"{s.name} puts {k * n} {s.things} into bags of {n}. How many bags does {s.name} fill?"


def _shelves(r: random.Random, w: _Work, s: Scene) -> str:
    k, n = r.randint(2, 12), r.randint(2, 12)
    w(k, "*", n)
    return f"There are {k} shelves with {n} {s.things} on each shelf. How many {s.things} are there in total?"


def _shop(r: random.Random, w: _Work, s: Scene) -> str:
    a, b, c, k, n = r.randint(200, 999), r.randint(10, 99), r.randint(10, 99), r.randint(2, 9), r.randint(10, 50)
    w(w(w(a, "-", b), "-", c), "+", w(k, "*", n))
    return (f"A shop has {a} {s.things}. It sells {b} in the morning and {c} in the afternoon, then receives "
            f"{k} boxes of {n} {s.things}. How many {s.things} does the shop have now?")


def _crates(r: random.Random, w: _Work, s: Scene) -> str:
    k, n = r.randint(3, 9), r.randint(40, 99)
    b, c = r.randint(10, k * n // 2), r.randint(10, 99)
    w(w(w(k, "*", n), "-", b), "+", c)
    return (f"{s.name} packs {k} crates of {n} {s.things}, then {s.loses} {b} of them and {s.gains} {c} more. "
            f"How many {s.things} does {s.name} have now?")


def _times_as_many(r: random.Random, w: _Work, s: Scene) -> str:
    a, m = r.randint(20, 99), r.randint(5, 9)
    b = r.randint(10, m * a // 2)
    w(a, "+", w(w(m, "*", a), "-", b))
    return (f"{s.name} has {a} {s.things}. {s.other} has {m} times as many and then {s.loses} {b} of them. "
            f"How many {s.things} do {s.name} and {s.other} have altogether now?")


def _boxes_shared(r: random.Random, w: _Work, s: Scene) -> str:
    g, per = r.randint(2, 6), r.randint(50, 150)
    total = g * per
    n = r.randint(10, min(50, (total - 1) // 2))
    k = r.randint(2, (total - 1) // n)
    extra = total - k * n
    w(w(w(k, "*", n), "+", extra), "/", g)
    return (f"{s.name} buys {k} boxes of {n} {s.things} and another {extra} {s.things}, then shares them equally "
            f"among {g} friends. How many {s.things} does each friend get?")


TEMPLATES: dict[int, tuple[Template, ...]] = {
    1: (_gain, _loss, _together, _compare),
    2: (_gain_then_loss, _more_than, _box, _three_days),
    3: (_packs, _share, _bags, _shelves),
    4: (_shop, _crates, _times_as_many, _boxes_shared),
}


def make_problem(rng: random.Random, level: int) -> WordProblem:
    """A random word problem of difficulty ``level`` (1-4)."""
    name, other = rng.sample(NAMES, 2)
    scene = Scene(name, other, rng.choice(THINGS), rng.choice(GAINS), rng.choice(LOSSES))
    work = _Work()
    template = rng.choice(TEMPLATES[level])
    question = template(rng, work, scene)
    return WordProblem(question, tuple(work.steps), work.result, template.__name__.lstrip("_"), scene)


def split_of(question: str) -> str:
    """The one split that a question may appear in (a stable hash of its text decides)."""
    digest = hashlib.blake2b(question.encode(), digest_size=8).digest()
    return SPLITS[int.from_bytes(digest, "big") % len(SPLITS)]


def word_problems(split: str, seed: int) -> Iterator[WordProblem]:
    """The endless, deterministic stream of ``split``'s word problems for ``seed`` (levels take turns)."""
    rng = random.Random(f"arithmetic/{split}/{seed}")
    for i in count():
        problem = make_problem(rng, LEVELS[i % len(LEVELS)])
        while split_of(problem.question) != split:
            problem = make_problem(rng, LEVELS[i % len(LEVELS)])
        yield problem


def problems(split: str, seed: int) -> Iterator[Problem]:
    """The endless, deterministic stream of ``split``'s problems for ``seed``."""
    for i, problem in enumerate(word_problems(split, seed)):
        reference = " ".join(problem.steps) + f" The answer is {problem.answer}."
        yield Problem(f"arithmetic-{split}-{i:05d}", f"Question: {problem.question}", reference, str(problem.answer))


class Arithmetic(Task):
    """Generated arithmetic word problems with graded difficulty; exact match of the final number.

    ``limit`` examples per split (``DEFAULT_COUNT`` when None). Few-shot examples are the first
    ones of the train stream; when evaluating ``train``, the examples start after them.
    """

    name = "arithmetic"
    metric = "exact_match"

    def examples(self, split, limit=None, data_file=None, seed=0, few_shot=0):
        if data_file is not None:
            raise SpeccascadeError(f"{self.name} generates its own problems; it takes no data file")
        if split not in SPLITS:
            raise SpeccascadeError(f"unknown split {split!r} for {self.name}; choose one of {', '.join(SPLITS)}")
        check_counts(limit, few_shot)
        start = few_shot if split == "train" else 0
        chosen = list(islice(self.problems(split, seed), start, start + (DEFAULT_COUNT if limit is None else limit)))
        shots = list(islice(self.problems("train", seed), few_shot))
        return assemble(chosen, shots, STEP_BY_STEP, "Answer:", f"{self.name} (split {split!r})")

    def problems(self, split: str, seed: int) -> Iterator[Problem]:
        """The stream of ``split``'s problems, which ``examples`` prompts (a subclass may word them otherwise)."""
        return problems(split, seed)

    def score(self, prediction, example):
        return metrics.number_match(prediction, example.answer)
