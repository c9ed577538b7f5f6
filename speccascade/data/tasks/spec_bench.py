"""``spec-bench``: Spec-Bench's 480 prompts (Xia et al., ACL 2024 Findings) from a local copy of its ``question.jsonl``.

Records hold ``question_id``, ``category``, ``turns`` (the user's messages) and, for some, ``reference``.
The file's categories map to Spec-Bench's six (:data:`CATEGORIES`): MT-Bench's eight (writing, roleplay,
reasoning, math, coding, extraction, stem, humanities; two turns each) are ``mt_bench``, with the fine
category kept in the example id (``writing-81``); translation (WMT14 de-en), summarization (CNN/DM), qa
(Natural Questions), math_reasoning (GSM8K) and rag keep their names. A prompt is its turn as written (no
instruction is added), and the examples come category by category in turn (the first of each category,
then the second, ...), so that any ``--limit`` covers the categories alike.

Quality where a reference exists (:data:`METRICS`): sentence BLEU for translation, ROUGE-2 F1 for
summarization, the final number for math_reasoning (the reference's ``#### N``, as for gsm8k), and for rag
whether the reply contains one of the acceptable answers (:func:`~speccascade.data.metrics.contains_answer`):
its gold answers are short phrases that a correct reply states inside a sentence, where an exact match
would fail it. qa and mt_bench are not scored (NaN): Spec-Bench gives Natural Questions no answers, and
MT-Bench is judged by a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain, zip_longest

from ...errors import SpeccascadeError
from .. import metrics
from .base import Example, Task, check_counts, check_ids
from .corpora import GSM8K
from .records import read_records

CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
METRICS = {"translation": "bleu", "summarization": "rouge2", "math_reasoning": "exact_match", "rag": "contains_answer"}


def category_of(fine: str) -> str | None:
    """Spec-Bench's category of a record's ``category`` field (an MT-Bench one is ``mt_bench``); None if unknown."""
    return "mt_bench" if fine in MT_BENCH else fine if fine in CATEGORIES else None


def _reference_problem(category: str, reference: object) -> str | None:
    if not isinstance(reference, list):
        return "field 'reference' is not a list"
    first = reference[0] if reference else None
    if category == "rag":
        if not isinstance(first, list) or not first or not all(isinstance(a, str) for a in first):
            return "field 'reference' of a rag record is not a list holding a list of answer strings"
    elif reference and not isinstance(first, str):
        return "field 'reference' does not start with a string"
    elif category == "math_reasoning" and first is not None and GSM8K().problem({"question": "", "answer": first}):
        return "field 'reference' of a math_reasoning record does not end with '#### N' (GSM8K's final answer)"
    return None


def record_problem(record: dict) -> str | None:
    """What is wrong with one record of the file, or None."""
    if not isinstance(record.get("question_id"), (int, str)):
        return "record has no 'question_id' (a number or a string)"
    fine = record.get("category")
    if not isinstance(fine, str) or category_of(fine) is None:
        return f"unknown category {fine!r}; Spec-Bench has {', '.join(CATEGORIES[1:])} and MT-Bench's {', '.join(MT_BENCH)}"
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        return "field 'turns' is not a non-empty list of strings"
    return None if record.get("reference") is None else _reference_problem(category_of(fine), record["reference"])


def make(record: dict) -> Example:
    """The example of one valid record: its first turn, later turns, category and (where given) reference."""
    fine, turns = record["category"], record["turns"]
    category, reference = category_of(fine), record.get("reference") or []
    gold, answer = "", ""  # no reference: not scored
    if category in ("translation", "summarization") and reference:
        gold = answer = reference[0].strip()
    elif category == "math_reasoning" and reference:
        worked = GSM8K().make({"question": turns[0], "answer": reference[0]}, "")
        gold, answer = worked.reference, worked.answer
    elif category == "rag" and reference:
        answers = [a.strip() for a in reference[0]]
        gold, answer = answers[0], "\n".join(answers)
    return Example(f"{fine}-{record['question_id']}", turns[0], gold, answer, category, tuple(turns[1:]))


class SpecBench(Task):
    """Spec-Bench's prompts from a local ``question.jsonl`` (``--data-file``; one split, ``test``); the
    metric of each category (module docstring)."""

    name = "spec-bench"
    metric = "per-category"

    def examples(self, split, limit=None, data_file=None, seed=0, few_shot=0):
        check_counts(limit, few_shot)
        if data_file is None:
            raise SpeccascadeError("spec-bench reads a local copy of Spec-Bench's question.jsonl: pass --data-file")
        if split != "test":
            raise SpeccascadeError(f"spec-bench has one split, 'test', not {split!r}")
        if few_shot:
            raise SpeccascadeError("spec-bench takes no few-shot examples: its prompts are used as written")
        examples = [make(record) for record in read_records(data_file, record_problem)]
        check_ids([e.id for e in examples], f"spec-bench ({data_file})")
        grouped = [[e for e in examples if e.category == c] for c in CATEGORIES]
        in_turn = [e for e in chain.from_iterable(zip_longest(*grouped)) if e is not None]
        return in_turn if limit is None else in_turn[:limit]

    def score(self, prediction, example):
        metric = METRICS.get(example.category)
        if metric is None or not example.answer:
            return float("nan")
        if metric == "bleu":
            return metrics.bleu(prediction.strip(), example.answer)
        if metric == "rouge2":
            return metrics.rouge2(prediction, example.answer)
        if metric == "exact_match":
            return metrics.number_match(prediction, example.answer)
        return metrics.contains_answer(prediction, example.answer.split("\n"))

    def metric_of(self, category):
        return METRICS.get(category, "none")


def select(examples: list[Example], categories: Sequence[str] | None, per_category: int | None) -> list[Example]:
    """The examples of ``categories`` (all when None), at most ``per_category`` of each, in their order.

    A category Spec-Bench does not have, one named twice, or one with no example in the data is an error naming it.
    """
    for i, category in enumerate(categories or ()):
        if category not in CATEGORIES:
            raise SpeccascadeError(f"unknown category {category!r} (--categories); Spec-Bench's are {', '.join(CATEGORIES)}")
        if category in categories[:i]:
            raise SpeccascadeError(f"--categories names {category!r} more than once")
        if not any(e.category == category for e in examples):
            raise SpeccascadeError(f"the data has no examples in category {category!r} (--categories)")
    taken: dict[str, int] = {}
    chosen = []
    for e in examples:
        if (categories is None or e.category in categories) and taken.get(e.category, 0) < (per_category or len(examples)):
            taken[e.category] = taken.get(e.category, 0) + 1
            chosen.append(e)
    return chosen
