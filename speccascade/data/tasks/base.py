"""The task contract (``Example``, ``Task``) and the prompt layout that every task shares.

A prompt is plain text for one user message (the model pair applies its chat template):
the task's instruction, then each few-shot example solved (query, label, reference),
then the query to answer. The reference is the gold reply to that message.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ...errors import SpeccascadeError

STEP_BY_STEP = 'Solve the problem step by step, and end with "The answer is N." where N is the final number.'


@dataclass(frozen=True)
class Example:
    """One example: ``prompt`` for the model, ``reference`` gold reply, ``answer`` for the metric.

    ``category`` groups examples of a task that has categories (spec-bench's six; "" elsewhere), and
    ``followups`` are the user's later turns of a multi-turn prompt, each sent after the model's reply
    to the turn before it (``prompt`` is the first turn).
    """

    id: str
    prompt: str
    reference: str
    answer: str
    category: str = ""
    followups: tuple[str, ...] = ()


CHECKABLE_METRICS = frozenset({"exact_match"})  # metrics that check one answer: outcome labels compare them


class Task(ABC):
    """A source of examples and the metric that scores a model's reply to one."""

    name: ClassVar[str]
    metric: ClassVar[str]

    @property
    def checkable(self) -> bool:
        """Whether a reply has one answer the metric checks (exact match), so swapping a token can be said to change it."""
        return self.metric in CHECKABLE_METRICS

    @abstractmethod
    def examples(
        self,
        split: str,
        limit: int | None = None,
        data_file: str | Path | None = None,
        seed: int = 0,
        few_shot: int = 0,
    ) -> list[Example]:
        """The first ``limit`` examples of ``split`` (all when None) in a fixed order, each prompt
        preceded by ``few_shot`` solved examples from the training data."""

    @abstractmethod
    def score(self, prediction: str, example: Example) -> float:
        """The task's metric for one prediction, in [0, 1]; NaN where the example has no reference to score against."""

    def metric_of(self, category: str) -> str:
        """The metric that scores ``category``'s examples (one metric for a task without categories)."""
        return self.metric


@dataclass(frozen=True)
class Problem:
    """An example before prompting: the ``query`` that the prompt ends with, and its gold reply and answer."""

    id: str
    query: str
    reference: str
    answer: str


def check_counts(limit: int | None, few_shot: int) -> None:
    """Refuse negative counts, which would otherwise slice from the end."""
    if limit is not None and limit < 0:
        raise SpeccascadeError(f"limit must be >= 0, got {limit}")
    if few_shot < 0:
        raise SpeccascadeError(f"few_shot must be >= 0, got {few_shot}")


def check_ids(ids: list[str], what: str) -> None:
    """Refuse a source with no examples, or with two examples of one id (records and reports key on it)."""
    if not ids:
        raise SpeccascadeError(f"{what} has no examples")
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise SpeccascadeError(f"{what} has more than one example with id {repeated[0]!r}")


def conversation(example: Example, replies: list[str]) -> list[dict[str, str]]:
    """The chat messages of ``example`` after the model's ``replies`` to its first turns: each user turn followed
    by its reply, ending with the next user turn (Spec-Bench's multi-turn prompts, run turn by turn)."""
    turns = [example.prompt, *example.followups][: len(replies) + 1]
    messages = []
    for turn, reply in zip(turns, [*replies, None]):
        messages.append({"role": "user", "content": turn})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return messages


def assemble(problems: list[Problem], shots: list[Problem], instruction: str, label: str, what: str) -> list[Example]:
    """Prompted examples; ``what`` names the source in the error raised when there are none."""
    check_ids([p.id for p in problems], what)
    preface = "".join(f"{s.query}\n{label} {s.reference}\n\n" for s in shots)
    return [Example(p.id, f"{instruction}\n\n{preface}{p.query}", p.reference, p.answer) for p in problems]
