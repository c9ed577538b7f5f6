"""The harmless share of outcome-labelled mismatches (benchmarks/outcome_share.py), digit swaps apart."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import outcome_share  # noqa: E402
from outcome_share import digit_tokens, per_example, summary  # noqa: E402

from speccascade.decoding.presets import byte_tokenizer  # noqa: E402


def _examples() -> pd.DataFrame:
    """Three right replies and a wrong one: 10 mismatches in the right ones, 4 of them digit swaps (3 harmful),
    2 harmful others; the wrong reply's mismatches count nowhere in the right-reply shares."""
    return pd.DataFrame({"score": [1, 1, 1, 0], "examined": [10, 10, 10, 10], "mismatches": [4, 4, 2, 5],
                         "harmful": [2, 2, 1, 0], "helpful": [0, 0, 0, 1], "digit_mismatches": [2, 1, 1, 3],
                         "digit_harmful": [1, 1, 1, 0]}, index=["a", "b", "c", "d"])


def test_harmless_shares_split_digit_swaps_from_the_others():
    out = summary(_examples())
    assert out["mismatches_in_right_replies"] == 10 and out["harmful_in_right_replies"] == 5
    assert out["harmless_share_in_right_replies"]["estimate"] == pytest.approx(0.5)
    kinds = out["by_kind_in_right_replies"]
    assert (kinds["digit"]["mismatches"], kinds["digit"]["harmful"]) == (4, 3)
    assert (kinds["other"]["mismatches"], kinds["other"]["harmful"]) == (6, 2)
    assert kinds["digit"]["harmless_share"]["estimate"] == pytest.approx(0.25)
    assert kinds["other"]["harmless_share"]["estimate"] == pytest.approx(4 / 6)
    for kind in kinds.values():
        assert kind["harmless_share"]["low"] <= kind["harmless_share"]["estimate"] <= kind["harmless_share"]["high"]


def test_without_the_digit_columns_there_is_no_split():
    assert "by_kind_in_right_replies" not in summary(_examples().drop(columns=["digit_mismatches", "digit_harmful"]))


def test_digit_tokens_flag_the_ids_whose_text_holds_a_digit():
    tokenizer = byte_tokenizer()
    flags = digit_tokens(tokenizer, size=len(tokenizer) + 3)
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert all(flags[i] for i in ids("0123456789")) and not any(flags[i] for i in ids("we the +"))
    assert len(flags) == len(tokenizer) + 3 and not flags[len(tokenizer):].any()  # padded ids: no text, no digit


def test_per_example_counts_a_swap_as_a_digit_swap_when_either_token_is_a_digit(monkeypatch):
    from datasets import Dataset

    digits = np.array([False, False, True, True])  # token ids 2 and 3 are digits
    rows = Dataset.from_dict({"example_id": ["a", "a", "a", "a", "b"], "examined": [1, 1, 1, 0, 1],
                              "draft_token": [0, 2, 1, 2, 3], "target_argmax": [1, 0, 1, 0, 3],
                              "outcome_harm": [1.0, 1.0, 0.0, np.nan, 0.0], "outcome_delta": [1.0, 1.0, 0.0, np.nan, 0.0],
                              "score": [1.0] * 5})
    monkeypatch.setattr(outcome_share.traces, "load_traces", lambda directory: rows)
    out = per_example(["traces"], digits)
    # a: a word swap (harmful), a digit swap (harmful), a match, an unexamined digit swap; b: a matching digit
    assert out.loc["0:a", ["mismatches", "harmful", "digit_mismatches", "digit_harmful"]].tolist() == [2, 2, 1, 1]
    assert out.loc["0:b", ["mismatches", "digit_mismatches"]].tolist() == [0, 0]
