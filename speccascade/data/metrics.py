"""Task metrics: each scores one prediction against its gold answer in [0, 1]."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache

# A number as models write it: "-3", "$1,234", "18.00", "2.5", "50%". A "-" glued to a word or a
# closing bracket is an operator ("16-3" is 16 and 3), not a sign.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)%?")
_MARKER = re.compile(r"####|answer is:?", re.IGNORECASE)
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_number(text: str) -> str | None:
    """Canonical text of a number: ``"$1,234.00"`` -> ``"1234"``, ``"-2.50"`` -> ``"-2.5"``; None if no number."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").removesuffix("%")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return format(value.normalize(), "f") if value else "0"


def final_number(text: str) -> str | None:
    """The number a model gave as its answer, normalised; None if it gave none.

    That is the first number after the last ``####`` or ``answer is`` that has one, else the last
    number in the text (GSM8K convention).
    """
    for marker in reversed(list(_MARKER.finditer(text))):
        found = _NUMBER.search(text, marker.end())
        if found:
            return normalize_number(found.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def number_match(prediction: str, answer: str) -> float:
    """1.0 when the prediction's final number equals ``answer`` after normalisation, else 0.0."""
    predicted = final_number(prediction)
    return float(predicted is not None and predicted == normalize_number(answer))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD exact match: 1.0 when the normalised prediction equals any normalised gold answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(gold) for gold in _golds(answers)))


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # an empty answer matches only an empty answer
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD F1: the best token-overlap F1 of the prediction against any gold answer."""
    return max((_token_f1(prediction, gold) for gold in _golds(answers)), default=0.0)


def contains_answer(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when any gold answer occurs in the prediction as whole words, both SQuAD-normalised, else 0.0.

    For free-form replies that should state an answer somewhere (Spec-Bench's RAG): a reply that names
    "a carbon sink" among other things contains the gold answer "acting as a carbon sink" only if it
    says all of it; "10" does not contain "1".
    """
    text = f" {normalize_answer(prediction)} "
    return float(any(f" {gold} " in text for gold in map(normalize_answer, _golds(answers)) if gold))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)


def rouge2(prediction: str, reference: str) -> float:
    """ROUGE-2 F1 (rouge-score, Porter stemming), as XSum results report it."""
    return _rouge_scorer().score(reference, prediction)["rouge2"].fmeasure


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU (sacrebleu defaults) divided by 100."""
    import sacrebleu

    return min(1.0, sacrebleu.sentence_bleu(prediction, [reference]).score / 100)
