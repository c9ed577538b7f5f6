"""Shared fixtures: tiny random model pairs (no files, no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# A new machine's arithmetic, on demand: SPECCASCADE_TEST_THREADS=1 trains on one thread (subprocesses: OMP_NUM_THREADS),
# SPECCASCADE_TEST_BF16=off computes without bf16 autocast where the CPU would use it (finetune --precision auto).
if os.environ.get("SPECCASCADE_TEST_THREADS"):
    os.environ["OMP_NUM_THREADS"] = os.environ["SPECCASCADE_TEST_THREADS"]
    import torch

    torch.set_num_threads(int(os.environ["SPECCASCADE_TEST_THREADS"]))
if os.environ.get("SPECCASCADE_TEST_BF16") == "off":
    import torch

    torch.ops.mkldnn._is_mkldnn_bf16_supported = lambda: False

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
