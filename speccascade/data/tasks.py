"""Tasks: where examples come from, how they are prompted, and how an answer is scored.

Each task loads its data from the Hugging Face hub by name, or from a local JSONL/parquet file
with the hub dataset's fields (``--data-file``), except ``arithmetic``, which generates its own.
Prompts are plain user messages; the model pair applies its chat template.
"""

from __future__ import annotations

import json
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable

from ..errors import SpeccascadeError
from . import metrics

ANSWER_FORMAT = 'Solve it step by step and end with "The answer is N."'


@dataclass(frozen=True)
class Example:
    """One task example: ``prompt`` for the model, ``reference`` gold continuation, ``answer`` for the metric."""

    id: str
    prompt: str
    reference: str
    answer: str


class Task(ABC):
    name: ClassVar[str]
    metric: ClassVar[str]

    @abstractmethod
    def examples(
        self, split: str, limit: int | None = None, data_file: str | Path | None = None, seed: int = 0, few_shot: int = 0
    ) -> list[Example]:
        """The first ``limit`` examples of ``split`` (all when None), in a fixed order."""

    @abstractmethod
    def score(self, prediction: str, example: Example) -> float:
        """The task's metric for one prediction, in [0, 1]."""


def _nonempty(examples: list[Example], what: str) -> list[Example]:
    if not examples:
        raise SpeccascadeError(f"{what} has no examples")
    return examples


# ---------------------------------------------------------------- arithmetic

NAMES = ("Tom", "Ana", "Raj", "Mei", "Sam", "Lena", "Omar", "Ivy", "Ben", "Zoe")
THINGS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells")
SPLITS = ("train", "validation", "test")


def _problem(rng: random.Random, level: int, residue: int) -> tuple[str, list[str], int]:
    """A word problem of difficulty ``level`` (1-4): question, worked steps, answer.

    The first number of a problem is ``residue`` mod 3, so the three splits never share a question.
    """

    def first(lo: int, hi: int) -> int:
        a = rng.randint(lo, hi)
        return a + (residue - a) % 3

    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    if level == 1:
        a, b = first(2, 20), rng.randint(1, 9)
        if rng.random() < 0.5:
            return (f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
                    [f"{a} + {b} = {a + b}."], a + b)
        return (f"{name} has {a + b} {thing} and gives away {b}. How many {thing} are left?",
                [f"{a + b} - {b} = {a}."], a)
    if level == 2:
        a, b, c = first(10, 40), rng.randint(2, 20), rng.randint(1, 9)
        return (f"{name} has {a} {thing}, buys {b} more and then loses {c}. How many {thing} does {name} have?",
                [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c)
    if level == 3:
        k, n = first(2, 12), rng.randint(2, 12)
        if rng.random() < 0.5:
            return (f"{name} buys {k} boxes of {thing} with {n} {thing} in each box. How many {thing} is that?",
                    [f"{k} * {n} = {k * n}."], k * n)
        return (f"{name} shares {k * n} {thing} equally among {k} friends. How many {thing} does each friend get?",
                [f"{k * n} / {k} = {n}."], n)
    a, b, c = first(200, 999), rng.randint(10, 99), rng.randint(10, 99)
    k, n = rng.randint(2, 9), rng.randint(10, 50)
    left = a - b - c
    return (f"A shop has {a} {thing}. It sells {b} in the morning and {c} in the afternoon, then receives "
            f"{k} boxes of {n} {thing}. How many {thing} does it have now?",
            [f"{a} - {b} - {c} = {left}.", f"{k} * {n} = {k * n}.", f"{left} + {k * n} = {left + k * n}."], left + k * n)


class Arithmetic(Task):
    """Generated arithmetic word problems, levels 1-4 in turn (1-step to multi-step, up to 3 digits)."""

    name = "arithmetic"
    metric = "exact_match"

    def examples(self, split, limit=None, data_file=None, seed=0, few_shot=0):
        if split not in SPLITS:
            raise SpeccascadeError(f"arithmetic has splits {', '.join(SPLITS)}, not {split!r}")
        if data_file is not None:
            raise SpeccascadeError("arithmetic generates its own data; it takes no --data-file")
        count = 1000 if limit is None else limit
        shots = self._generate("train", few_shot, seed + 1, offset=10**6)[:few_shot]
        preface = "".join(f"Question: {s.prompt.split(chr(10))[0]}\nAnswer: {s.reference}\n\n" for s in shots)
        return [Example(ex.id, preface + ex.prompt, ex.reference, ex.answer)
                for ex in self._generate(split, count, seed)]

    @staticmethod
    def _generate(split: str, count: int, seed: int, offset: int = 0) -> list[Example]:
        rng = random.Random(f"arithmetic-{split}-{seed}")
        out = []
        for i in range(count):
            question, steps, answer = _problem(rng, 1 + i % 4, SPLITS.index(split))
            reference = " ".join(steps) + f" The answer is {answer}."
            out.append(Example(f"arithmetic-{split}-{offset + i:05d}", f"{question}\n{ANSWER_FORMAT}", reference, str(answer)))
        return out

    def score(self, prediction, example):
        return metrics.number_match(prediction, example.answer)


# ---------------------------------------------------------------- data files and the hub


def read_records(path: str | Path, required: Iterable[str]) -> list[dict]:
    """Records of a local ``.jsonl``/``.json`` (JSON lines) or ``.parquet`` file, each with the ``required`` fields."""
    path = Path(path)
    if not path.is_file():
        raise SpeccascadeError(f"data file {str(path)!r} not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
        lines = range(1, len(records) + 1)
    else:
        records, lines = [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SpeccascadeError(f"{path}:{number}: invalid JSON: {err.msg}") from err
            lines.append(number)
    for record, number in zip(records, lines):
        missing = [f for f in required if not isinstance(record, dict) or f not in record]
        if missing:
            raise SpeccascadeError(f"{path}:{number}: record has no field {missing[0]!r}")
    return records


def hub_records(name: str, config: str | None, split: str) -> list[dict]:
    """A split of a hub dataset, with one clear error when it cannot be had (offline, say)."""
    try:
        from datasets import load_dataset

        return list(load_dataset(name, config, split=split))
    except Exception as err:  # noqa: BLE001 - any loading failure ends the same way for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpeccascadeError(f"cannot load dataset {name!r} from the hub ({reason}); pass --data-file") from err


class RecordTask(Task):
    """A task over records from the hub or a local file; subclasses turn one record into an Example."""

    hub: ClassVar[tuple[str, str | None]]
    fields: ClassVar[tuple[str, ...]]

    def examples(self, split, limit=None, data_file=None, seed=0, few_shot=0):
        records = read_records(data_file, self.fields) if data_file else hub_records(*self.hub, split)
        shots, records = records[:few_shot], records[few_shot:]
        preface = "".join(f"{self.make(r, 0).prompt}\n{self.make(r, 0).reference}\n\n" for r in shots)
        chosen = records if limit is None else records[:limit]
        examples = [self.make(r, few_shot + i, split) for i, r in enumerate(chosen)]
        examples = [Example(e.id, preface + e.prompt, e.reference, e.answer) for e in examples]
        return _nonempty(examples, f"{self.name} ({data_file or self.hub[0]}, {split})")

    @abstractmethod
    def make(self, record: dict, index: int, split: str = "train") -> Example:
        """The example of one record."""


class GSM8K(RecordTask):
    """Grade-school maths (``openai/gsm8k``): ``question``, ``answer`` ending in ``#### N``."""

    name = "gsm8k"
    metric = "exact_match"
    hub = ("openai/gsm8k", "main")
    fields = ("question", "answer")

    def make(self, record, index, split="train"):
        solution, _, final = record["answer"].rpartition("####")
        steps = re.sub(r"<<[^>]*>>", "", solution).strip()
        answer = final.strip()
        reference = f"{steps}\nThe answer is {answer}." if steps else f"The answer is {answer}."
        return Example(f"gsm8k-{split}-{index:05d}", f"{record['question']}\n{ANSWER_FORMAT}", reference, answer)

    def score(self, prediction, example):
        return metrics.number_match(prediction, example.answer)


class Summarisation(RecordTask):
    """One-sentence news summaries (XSum, ``EdinburghNLP/xsum``: ``document``, ``summary``); ROUGE-2."""

    name = "summarisation"
    metric = "rouge2"
    hub = ("EdinburghNLP/xsum", None)
    fields = ("document", "summary")

    def make(self, record, index, split="train"):
        prompt = f"Summarize the following article in one sentence.\n\n{record['document']}"
        return Example(str(record.get("id", f"xsum-{split}-{index:05d}")), prompt, record["summary"], record["summary"])

    def score(self, prediction, example):
        return metrics.rouge2(prediction, example.answer)


class Translation(RecordTask):
    """English to German (WMT14, ``wmt/wmt14`` de-en: ``translation.{en,de}``, or flat ``source``/``target``); BLEU."""

    name = "translation"
    metric = "bleu"
    hub = ("wmt/wmt14", "de-en")
    fields = ()

    def make(self, record, index, split="train"):
        if "translation" in record:
            source, target = record["translation"]["en"], record["translation"]["de"]
        elif "source" in record and "target" in record:
            source, target = record["source"], record["target"]
        else:
            raise SpeccascadeError(f"translation record {index} needs 'translation' (en, de) or 'source' and 'target'")
        return Example(f"wmt-{split}-{index:05d}", f"Translate from English to German:\n\n{source}", target, target)

    def score(self, prediction, example):
        return metrics.bleu(prediction.strip(), example.answer)


class QA(RecordTask):
    """Extractive QA (SQuAD, ``rajpurkar/squad``: ``context``, ``question``, ``answers.text``); F1."""

    name = "qa"
    metric = "f1"
    hub = ("rajpurkar/squad", None)
    fields = ("context", "question", "answers")

    def make(self, record, index, split="train"):
        answers = record["answers"]["text"] if isinstance(record["answers"], dict) else list(record["answers"])
        if not answers:
            raise SpeccascadeError(f"qa record {index} has no answers")
        prompt = (f"Answer the question with a short span from the passage.\n\nPassage: {record['context']}\n\n"
                  f"Question: {record['question']}")
        return Example(str(record.get("id", f"squad-{split}-{index:05d}")), prompt, answers[0], "\n".join(answers))

    def score(self, prediction, example):
        return metrics.f1(prediction, example.answer.split("\n"))


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Arithmetic, GSM8K, Summarisation, Translation, QA)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise SpeccascadeError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]()
