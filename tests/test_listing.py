"""The one splitter of list settings: items stripped, empty items refused naming the setting, YAML lists too."""

from __future__ import annotations

import pytest

from speccascade.bench.command import _batch_sizes
from speccascade.errors import SpeccascadeError
from speccascade.finetune.module import parse_layers
from speccascade.listing import split_list


@pytest.mark.parametrize("value, items", [
    ("opt", ["opt"]),
    (" opt : 0.3 ,diff ", ["opt : 0.3", "diff"]),
    (["a", " b "], ["a", "b"]),
    (("a",), ["a"]),
])
def test_items_are_stripped_and_a_single_item_is_a_list(value, items):
    assert split_list(value, "--rules") == items


@pytest.mark.parametrize("value, message", [
    ("", "--heads names nothing"),
    (" , ", "--heads names nothing"),
    ([], "--heads names nothing"),
    ("a,,b", "--heads 'a,,b' has an empty item"),
    ("a,", "has an empty item"),
    (["a", " "], "has an empty item"),
])
def test_an_empty_list_or_item_is_one_line_naming_the_setting(value, message):
    with pytest.raises(SpeccascadeError, match=message) as err:
        split_list(value, "--heads")
    assert "\n" not in str(err.value)


def test_every_list_setting_splits_through_it():
    assert parse_layers(" 0-2, 5") == [0, 1, 2, 5] and parse_layers([3, 4]) == [3, 4]
    assert _batch_sizes(" 4, 1", prompts=8) == [1, 4]
    for parse, flag in ((parse_layers, "--layers"), (lambda text: _batch_sizes(text, prompts=8), "--batch-sizes")):
        with pytest.raises(SpeccascadeError, match=f"{flag} '1,,2' has an empty item"):
            parse("1,,2")
