"""List settings: the one splitter of every option that takes a list (a YAML list, or comma-separated text)."""

from __future__ import annotations

from .errors import SpeccascadeError


def split_list(value: str | list | tuple, setting: str) -> list[str]:
    """The items of a list setting, stripped; an empty list or an empty item (two commas in a row, a trailing
    comma) is refused with a one-line error naming ``setting`` (its flag, e.g. ``--rules``)."""
    items = [str(item).strip() for item in (value.split(",") if isinstance(value, str) else value)]
    if not any(items):
        raise SpeccascadeError(f"{setting} names nothing; give one or more items, comma-separated")
    if not all(items):
        raise SpeccascadeError(f"{setting} {value!r} has an empty item (two commas in a row, or a trailing comma)")
    return items
