"""The task registry: where examples come from, how they are prompted, and how a reply is scored.

``get_task(name)`` for ``arithmetic`` and ``worked-arithmetic`` (generated), ``gsm8k``, ``summarisation`` (XSum), ``cnn-dm``, ``translation``
and ``qa`` (from the hub, or from a local file with the hub dataset's fields), and ``spec-bench`` (a local copy of
Spec-Bench's prompts, by category).
"""

from __future__ import annotations

from ...errors import SpeccascadeError
from .arithmetic import Arithmetic
from .base import Example, Task
from .corpora import GSM8K, QA, CNNDailyMail, Summarisation, Translation
from .spec_bench import SpecBench
from .worked import WorkedArithmetic

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (Arithmetic, GSM8K, Summarisation, CNNDailyMail, Translation, QA,
                WorkedArithmetic,  # arithmetic's problems, GSM8K-style worked replies
                SpecBench)  # Spec-Bench's prompts from a local file, by category
}


def get_task(name: str) -> Task:
    """A fresh instance of the task called ``name``."""
    if name not in TASKS:
        raise SpeccascadeError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Example", "Task", "get_task"]
