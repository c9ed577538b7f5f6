"""Task metrics, each a score in [0, 1] for one prediction."""

from __future__ import annotations

import re
import string
from collections import Counter

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?%?|-?\$?\.\d+")


def normalize_number(text: str) -> str | None:
    """``"$1,234.00"`` -> ``"1234"``; ``"-2.50"`` -> ``"-2.5"``; None if ``text`` is no number."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").rstrip("%")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def final_number(text: str) -> str | None:
    """The answer a model gave: after ``####`` or ``The answer is``, else the last number in the text."""
    for marker in ("####", "answer is"):
        index = text.lower().rfind(marker.lower())
        if index >= 0:
            found = _NUMBER.search(text[index + len(marker) :])
            if found:
                return normalize_number(found.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def number_match(prediction: str, answer: str) -> float:
    """Final-answer exact match after number normalisation."""
    predicted = final_number(prediction)
    return float(predicted is not None and predicted == normalize_number(answer))


def squad_normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(squad_normalize(prediction) == squad_normalize(a) for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    """Best token-overlap F1 against any of the gold answers (SQuAD)."""

    def one(gold: str) -> float:
        pred_tokens, gold_tokens = squad_normalize(prediction).split(), squad_normalize(gold).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if not pred_tokens or not gold_tokens:
            return float(pred_tokens == gold_tokens)
        if common == 0:
            return 0.0
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)

    return max((one(a) for a in answers), default=0.0)


def rouge2(prediction: str, reference: str) -> float:
    """ROUGE-2 F1 (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True).score(reference, prediction)["rouge2"].fmeasure


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU (sacrebleu) scaled to [0, 1]."""
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score / 100
