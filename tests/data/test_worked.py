"""``worked-arithmetic``: the arithmetic problems with GSM8K-style worked replies.

The replies must be right (every equation, the final line), vary in wording yet be fixed by the
seed, stay within 60-150 SmolLM2 tokens, and keep the arithmetic task's questions and splits.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from speccascade.data import get_task, metrics
from speccascade.data.tasks import arithmetic, worked
from speccascade.decoding.presets import cache_dir

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
N = 200


@pytest.fixture(scope="module")
def test_split():
    return get_task("worked-arithmetic").examples("test", limit=N)


def test_splits_never_share_a_question_and_match_the_arithmetic_task():
    task = get_task("worked-arithmetic")
    questions = {s: [e.prompt.rsplit("\n", 1)[-1] for e in task.examples(s, limit=300)] for s in arithmetic.SPLITS}
    for a in arithmetic.SPLITS:
        for b in arithmetic.SPLITS:
            if a < b:
                assert not set(questions[a]) & set(questions[b]), (a, b)
    plain = get_task("arithmetic").examples("test", limit=300)
    assert questions["test"] == [e.prompt.rsplit("\n", 1)[-1] for e in plain]  # the same problems, in order
    assert [e.answer for e in plain] == [e.answer for e in task.examples("test", limit=300)]


def test_every_equation_is_right_and_the_reply_ends_with_the_answer(test_split):
    for e in test_split:
        body, last = e.reference.rsplit("\n", 1)
        assert last == f"The answer is {e.answer}."
        steps = EQUATION.findall(body)
        assert steps, e.reference
        for a, op, b, c in steps:
            assert OPS[op](int(a), int(b)) == int(c), e.reference
        assert str(e.answer) in {c for *_, c in steps}  # a step computes the answer
        assert get_task("worked-arithmetic").score(e.reference, e) == 1.0
        assert metrics.number_match(e.reference.replace(last, "The answer is 0."), e.answer) == float(e.answer == "0")


def test_same_seed_same_replies_and_another_seed_other_problems(test_split):
    task = get_task("worked-arithmetic")
    assert [e.reference for e in task.examples("test", limit=N)] == [e.reference for e in test_split]
    other = task.examples("test", limit=N, seed=1)
    assert [e.prompt for e in other] != [e.prompt for e in test_split]


def skeleton(sentence: str, names: set[str]) -> str:
    """A sentence's wording with its numbers, names and things blanked out."""
    words = ["#" if w.strip(".,:;") in names else w for w in re.sub(r"\d+", "N", sentence).split()]
    return " ".join(words)


def test_wording_varies_across_problems(test_split):
    names = set(arithmetic.NAMES) | set(arithmetic.THINGS)
    sentences = [s for e in test_split for s in re.split(r"(?<=\.) ", e.reference.rsplit("\n", 1)[0])]
    shapes = {skeleton(s, names) for s in sentences}
    assert len(shapes) >= 300  # of about 700 sentences: no template repeated wholesale
    openings = {skeleton(e.reference.split(". ")[0], names) for e in test_split}
    assert len(openings) >= 40
    # the step shapes and connectives are all used
    for phrase in ("so we", "since", "gives", "to find", "we know that", "which gives", "First,", "Finally,"):
        assert sum(phrase.lower() in e.reference.lower() for e in test_split) >= 5, phrase
    shops = [e.reference for p, e in zip(arithmetic.word_problems("test", 0), test_split) if p.kind == "shop"]
    delivery_first = sum(r.index(" * ") < r.index(" - ") for r in shops)  # the two parts of a shop problem
    assert 0 < delivery_first < len(shops)  # are told in either order
    kept = swapped = 0  # the generator's a + b (or a * b), told as written or as b + a
    for p, e in zip(arithmetic.word_problems("test", 0), test_split):
        told = set(EQUATION.findall(e.reference))
        for a, op, b, c in EQUATION.findall(" ".join(p.steps)):
            if op in "+*" and a != b:
                kept += (a, op, b, c) in told
                swapped += (b, op, a, c) in told
    assert kept > 50 and swapped > 50


def test_every_template_has_a_story():
    assert {t.__name__.lstrip("_") for ts in arithmetic.TEMPLATES.values() for t in ts} == set(worked.STORIES)


def smollm2_tokenizer():
    """The SmolLM2 tokenizer saved with the dequantised offline preset, or None where it was never built."""
    found = sorted((cache_dir() / "models").glob("SmolLM2-135M-Instruct*/tokenizer.json"))
    if not found:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(found[0]).parent))


def test_replies_are_60_to_150_tokens_long():
    """SmolLM2 tokens where its tokenizer is cached; always a word-count proxy (1.2-2.2 tokens a word)."""
    task = get_task("worked-arithmetic")
    replies = [e.reference for split in arithmetic.SPLITS for e in task.examples(split, limit=400)]
    words = [len(r.split()) for r in replies]
    assert 35 <= min(words) and max(words) <= 110
    tokenizer = smollm2_tokenizer()
    if tokenizer is None:
        pytest.skip("SmolLM2 tokenizer not cached (the smollm2-135m preset builds it): word proxy only")
    tokens = [len(tokenizer(r)["input_ids"]) for r in replies]
    assert 60 <= min(tokens) and max(tokens) <= 150
