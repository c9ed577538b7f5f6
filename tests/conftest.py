"""Shared fixtures: tiny random model pairs (no files, no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest

from speccascade.decoding import tiny_random_pair

PROMPTS = ["hello world", "a", "the quick brown fox jumps", "1 + 1 ="]
DEVICE = os.environ.get("SPECCASCADE_TEST_DEVICE", "cpu")  # "cuda" runs the decoder tests on a GPU


@pytest.fixture(scope="session")
def pair():
    return tiny_random_pair(seed=0, device=DEVICE)


@pytest.fixture(scope="session")
def batch(pair):
    """Prompts of different lengths, left-padded."""
    return pair.encode(PROMPTS, chat=False)
