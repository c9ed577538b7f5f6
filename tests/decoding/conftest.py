"""Fixtures of the decoder tests."""

from __future__ import annotations

import pytest

RAGGED = ["hello world", "a", "the quick brown fox jumps", "1 + 1 =", "one two three", "x y", "so it goes", "0",
          "lorem ipsum dolor sit amet", "b c"]


@pytest.fixture
def ragged(pair):
    """Ten prompts, and one token in seven an end of sequence, so rows end at different steps."""
    pair.target.generation_config.eos_token_id = list(range(3, pair.vocab_size, 7))
    yield pair.encode(RAGGED, chat=False)
    pair.target.generation_config.eos_token_id = 2
