"""Tasks over dataset records, read from a local file or from the Hugging Face hub.

A local file is JSON lines (``.jsonl`` or ``.json``) or ``.parquet`` with the hub dataset's fields;
when one is given the hub is never contacted. Every record is checked on reading, and a bad one
is reported as ``FILE:LINE: problem`` (LINE counts rows in a parquet file).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ...errors import SpeccascadeError
from .base import Problem, Task, assemble, check_counts


def field(record: dict, dotted: str) -> Any:
    """``record["a"]["b"]`` for ``"a.b"``; KeyError when any part is absent."""
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(dotted)
        value = value[key]
    return value


def text_fields_problem(record: dict, fields: Sequence[str]) -> str | None:
    """What is wrong with ``record`` if one of the (dotted) ``fields`` is absent or not a string."""
    for name in fields:
        try:
            value = field(record, name)
        except KeyError:
            return f"record has no field {name!r}"
        if not isinstance(value, str):
            return f"field {name!r} is not a string"
    return None


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SpeccascadeError(f"{path}:{number}: not UTF-8 text ({err.reason})") from err
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise SpeccascadeError(f"{path}:{number}: invalid JSON: {err.msg} (column {err.colno})") from err


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise SpeccascadeError(f"data file {str(path)!r} is not a readable parquet file ({err})") from err
    return enumerate(rows, start=1)


def read_records(path: str | Path, problem: Callable[[dict], str | None]) -> list[dict]:
    """The records of a local data file, in file order; ``problem`` says what is wrong with one, if anything."""
    path = Path(path)
    if not path.is_file():
        raise SpeccascadeError(f"data file {str(path)!r} not found")
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _json_lines(path)
    else:
        raise SpeccascadeError(f"data file {str(path)!r} is not .jsonl, .json (JSON lines) or .parquet")
    records = []
    for number, record in rows:
        wrong = "record is not a JSON object" if not isinstance(record, dict) else problem(record)
        if wrong:
            raise SpeccascadeError(f"{path}:{number}: {wrong}")
        records.append(record)
    return records


def hub_records(name: str, config: str | None, split: str, count: int | None = None) -> list[dict]:
    """The first ``count`` records (all when None) of a hub dataset's split, with one clear error when
    the dataset cannot be had (offline, say)."""
    try:
        from datasets import load_dataset

        data = load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - any loading failure ends the same way for the user
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SpeccascadeError(f"cannot load dataset {name!r} from the hub ({reason}); pass --data-file") from err
    if count is not None:
        data = data.select(range(min(count, len(data))))
    return data.to_list()


class RecordTask(Task):
    """A task over records. Subclasses name the hub dataset and turn one record into a Problem.

    Few-shot examples are the first records of the hub's train split, or the first records of a
    data file, which are then not evaluated. Example ids are the record's ``id`` field, else
    ``NAME-SPLIT-INDEX`` with the record's index in its split or file. ``seed`` is unused: the
    order of a file or hub split is fixed.
    """

    hub: ClassVar[tuple[str, str | None]]  # dataset id and config
    hub_splits: ClassVar[tuple[str, ...]]
    fields: ClassVar[tuple[str, ...]]  # dotted text fields every record needs
    instruction: ClassVar[str]
    label: ClassVar[str]  # put before the reference of a few-shot example

    def examples(self, split, limit=None, data_file=None, seed=0, few_shot=0):
        check_counts(limit, few_shot)
        if data_file is not None:
            records = read_records(data_file, self.problem)
            start, shots, source = few_shot, records[:few_shot], str(data_file)
        else:
            if split not in self.hub_splits:
                raise SpeccascadeError(f"{self.hub[0]} has splits {', '.join(self.hub_splits)}, not {split!r}")
            start = few_shot if split == "train" else 0
            records = hub_records(*self.hub, split, None if limit is None else start + limit)
            if split == "train":
                shots = records[:few_shot]
            else:
                shots = hub_records(*self.hub, "train", few_shot) if few_shot else []
            source = self.hub[0]
        chosen = records[start:] if limit is None else records[start : start + limit]
        problems = [self.make(record, self._id(record, split, start + i)) for i, record in enumerate(chosen)]
        shot_problems = [self.make(record, "") for record in shots]
        what = f"{self.name} ({source}, split {split!r})"
        return assemble(problems, shot_problems, self.instruction, self.label, what)

    def _id(self, record: dict, split: str, index: int) -> str:
        own = record.get("id")
        return str(own) if own is not None else f"{self.name}-{split}-{index:05d}"

    def problem(self, record: dict) -> str | None:
        """What is wrong with a record from a data file, or None; by default, a missing text field."""
        return text_fields_problem(record, self.fields)

    @abstractmethod
    def make(self, record: dict, example_id: str) -> Problem:
        """The problem of one valid record."""
