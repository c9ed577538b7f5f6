"""The hub-backed tasks: GSM8K, XSum summarisation, WMT14 en->de translation, SQuAD QA."""

from __future__ import annotations

import re

from .. import metrics
from .base import STEP_BY_STEP, Problem
from .records import RecordTask, field, text_fields_problem

_CALCULATOR = re.compile(r"<<[^>]*>>")


class GSM8K(RecordTask):
    """Grade-school maths (``openai/gsm8k``: ``question``, ``answer`` ending in ``#### N``); final-number match.

    The reference is the worked answer without its ``<<...>>`` calculator notes, ending "The answer is N."
    """

    name = "gsm8k"
    metric = "exact_match"
    hub = ("openai/gsm8k", "main")
    hub_splits = ("train", "test")
    fields = ("question", "answer")
    instruction = STEP_BY_STEP
    label = "Answer:"

    def problem(self, record):
        wrong = super().problem(record)
        if wrong is None:
            _, marker, final = record["answer"].rpartition("####")
            if not marker or not final.strip():
                return "field 'answer' does not end with '#### N'"
        return wrong

    def make(self, record, example_id):
        solution, _, final = record["answer"].rpartition("####")
        steps, answer = _CALCULATOR.sub("", solution).strip(), final.strip()
        reference = f"{steps}\nThe answer is {answer}." if steps else f"The answer is {answer}."
        return Problem(example_id, f"Question: {record['question']}", reference, answer)

    def score(self, prediction, example):
        return metrics.number_match(prediction, example.answer)


class Summarisation(RecordTask):
    """One-sentence news summaries (XSum, ``EdinburghNLP/xsum``: ``document``, ``summary``); ROUGE-2 F1."""

    name = "summarisation"
    metric = "rouge2"
    hub = ("EdinburghNLP/xsum", None)
    hub_splits = ("train", "validation", "test")
    fields = ("document", "summary")
    instruction = "Summarise the article in one sentence."
    label = "Summary:"

    def make(self, record, example_id):
        summary = record["summary"].strip()
        return Problem(example_id, f"Article: {record['document'].strip()}", summary, summary)

    def score(self, prediction, example):
        return metrics.rouge2(prediction, example.answer)


class CNNDailyMail(Summarisation):
    """Multi-sentence news highlights (CNN/DailyMail 3.0.0, ``abisee/cnn_dailymail``: ``article``,
    ``highlights``); ROUGE-2 F1."""

    name = "cnn-dm"
    hub = ("abisee/cnn_dailymail", "3.0.0")
    fields = ("article", "highlights")
    instruction = "Summarise the article in a few sentences."

    def make(self, record, example_id):
        summary = record["highlights"].strip()
        return Problem(example_id, f"Article: {record['article'].strip()}", summary, summary)


class Translation(RecordTask):
    """English to German (``wmt/wmt14`` de-en: ``translation.en``/``translation.de``, or flat
    ``source``/``target``); sentence BLEU / 100."""

    name = "translation"
    metric = "bleu"
    hub = ("wmt/wmt14", "de-en")
    hub_splits = ("train", "validation", "test")
    fields = ("translation.en", "translation.de")
    instruction = "Translate the English text into German. Reply with the translation only."
    label = "German:"

    def problem(self, record):
        if "translation" in record:
            return super().problem(record)
        if "source" in record or "target" in record:
            return text_fields_problem(record, ("source", "target"))
        return "record has no field 'translation' (or 'source' and 'target')"

    def make(self, record, example_id):
        if "translation" in record:
            source, target = field(record, "translation.en"), field(record, "translation.de")
        else:
            source, target = record["source"], record["target"]
        return Problem(example_id, f"English: {source.strip()}", target.strip(), target.strip())

    def score(self, prediction, example):
        return metrics.bleu(prediction.strip(), example.answer)


class QA(RecordTask):
    """Extractive QA (SQuAD, ``rajpurkar/squad``: ``context``, ``question``, ``answers.text``); SQuAD F1.

    The reference is the first gold answer; ``answer`` holds all of them, one per line.
    """

    name = "qa"
    metric = "f1"
    hub = ("rajpurkar/squad", None)
    hub_splits = ("train", "validation")
    fields = ("context", "question")
    instruction = "Answer the question with a short span copied from the passage."
    label = "Answer:"

    def problem(self, record):
        wrong = super().problem(record)
        if wrong is None:
            try:
                answers = field(record, "answers.text")
            except KeyError:
                return "record has no field 'answers.text'"
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                return "field 'answers.text' is not a non-empty list of strings"
        return wrong

    def make(self, record, example_id):
        answers = [a.strip() for a in record["answers"]["text"]]
        query = f"Passage: {record['context']}\nQuestion: {record['question']}"
        return Problem(example_id, query, answers[0], "\n".join(answers))

    def score(self, prediction, example):
        return metrics.f1(prediction, example.answer.split("\n"))
