"""Continuous batching (``generate``'s ``batch_size``): waiting prompts take the places of finished rows, and every
prompt decodes to the tokens it decodes to in one batch of all; decoders that keep their rows decode batch after
batch."""

from __future__ import annotations

import pytest
import torch

from speccascade.decoding import Autoregressive, SequentialCascade, SpeculativeCascade
from speccascade.decoding.state import Slots
from speccascade.deferral import rules
from speccascade.errors import SpeccascadeError
from tests.helpers import sliding_pair

MAX_NEW = 14
DECODERS = {
    "target alone": lambda pair, t: Autoregressive(pair, "target", temperature=t),
    "exact": lambda pair, t: SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3, temperature=t),
    "opt": lambda pair, t: SpeculativeCascade(pair, rules.OPT(alpha=0.3), block_size=3, temperature=t),
    "opt, bonus from p": lambda pair, t: SpeculativeCascade(pair, rules.OPT(alpha=0.3), block_size=3, temperature=t,
                                                            bonus="target"),
    "exact, adaptive blocks": lambda pair, t: SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4, temperature=t,
                                                                 draft_stop=0.3),
    "fly": lambda pair, t: SpeculativeCascade(pair, rules.FLy(), block_size=3, temperature=t),
    "sequential chow": lambda pair, t: SequentialCascade(pair, rules.Chow(alpha=0.5), temperature=t),
    "exact, static cache": lambda pair, t: SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3, temperature=t,
                                                              cache="static"),
    "target alone, static cache": lambda pair, t: Autoregressive(pair, "target", temperature=t, cache="static"),
}
# what a row counts whichever rows share its batch (a row's drafter forwards and block cuts follow its batch's rows)
OWN = ("target_calls", "new_tokens", "deferrals", "rejections")


@pytest.fixture
def joins(monkeypatch):
    """The number of rows of each join."""
    seen: list[int] = []
    replace = Slots.replace
    monkeypatch.setattr(Slots, "replace", lambda self, rows, ids, *a: seen.append(len(ids)) or replace(self, rows, ids, *a))
    return seen


def _counts(out, names=None) -> list[dict]:
    return [{k: v for k, v in row.items() if names is None or k in names} for row in out.stats.rows]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "T=1"])
@pytest.mark.parametrize("name", DECODERS)
def test_waiting_prompts_take_finished_rows_places_and_decode_the_same_tokens(pair, ragged, joins, name, temperature):
    ids, mask = ragged
    together = DECODERS[name](pair, temperature).generate(ids, mask, max_new_tokens=MAX_NEW, seed=5)
    decoder = DECODERS[name](pair, temperature)
    continuous = decoder.generate(ids, mask, max_new_tokens=MAX_NEW, seed=5, batch_size=3)
    lengths = [row["new_tokens"] for row in together.stats.rows]
    assert min(lengths) < MAX_NEW and len(set(lengths)) > 2  # rows ended at different steps
    assert decoder.refills(3) and sum(joins) == len(ids) - 3 and len(joins) > 1
    assert torch.equal(continuous.sequences, together.sequences)
    assert _counts(continuous, OWN) == _counts(together, OWN)
    if name.startswith(("exact", "target alone")) and "adaptive" not in name:  # every count is the row's own
        assert _counts(continuous) == _counts(together)


def test_continuous_batching_runs_fewer_blocks_than_batch_after_batch(pair, ragged, monkeypatch):
    ids, mask = ragged
    decoder = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3)
    blocks = []
    verify = decoder.verify
    monkeypatch.setattr(decoder, "verify", lambda state, fed: blocks.append(len(fed)) or verify(state, fed))
    fixed = decoder.in_batches(ids, mask, MAX_NEW, 0, 3)
    fixed_blocks, blocks[:] = list(blocks), []
    continuous = decoder.generate(ids, mask, max_new_tokens=MAX_NEW, batch_size=3)
    assert torch.equal(continuous.sequences, fixed.sequences)
    assert max(blocks) == 3 and len(blocks) < len(fixed_blocks)
    assert sum(blocks) <= sum(fixed_blocks)  # rows in blocks: finished rows ride along less


def test_a_prompt_longer_than_the_rows_decoding_joins_them(pair, joins):
    """The layout grows by holes at its end where a waiting prompt is longer than every decoding row's tokens."""
    prompts = ["a", "b", "the quick brown fox jumps over the lazy dog, again and again and again", "c"]
    ids, mask = pair.encode(prompts, chat=False)
    for temperature in (0.0, 1.0):
        decoder = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3, temperature=temperature)
        together = decoder.generate(ids, mask, max_new_tokens=4, seed=3)
        continuous = decoder.generate(ids, mask, max_new_tokens=4, seed=3, batch_size=2)
        assert torch.equal(continuous.sequences, together.sequences)
        assert _counts(continuous) == _counts(together)
    assert joins and int(mask[2].sum()) > 2 + 4 + 3  # longer than a short prompt with all its tokens and a block


@pytest.mark.parametrize("keeps", ["hook", "batch of one"])
def test_a_hook_or_a_batch_of_one_decodes_batch_after_batch(pair, ragged, joins, keeps):
    ids, mask = ragged
    extra = {"hook": lambda event: None} if keeps == "hook" else {}
    size = 1 if keeps == "batch of one" else 4
    decoder = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3, temperature=1.0, **extra)
    batched = decoder.generate(ids, mask, max_new_tokens=MAX_NEW, seed=5, batch_size=size)
    seeds = list(range(5, 5 + len(ids)))
    parts = [decoder.generate(ids[i : i + size], mask[i : i + size], max_new_tokens=MAX_NEW, seed=seeds[i : i + size])
             for i in range(0, len(ids), size)]
    assert not decoder.refills(size) and not joins
    assert _counts(batched) == [row for part in parts for row in _counts(part)]
    assert batched.stats.target_forwards == sum(part.stats.target_forwards for part in parts)
    width = batched.sequences.shape[1]
    assert torch.equal(batched.sequences, torch.cat([torch.nn.functional.pad(p.sequences, (0, width - p.sequences.shape[1]),
                                                                             value=pair.pad_token_id) for p in parts]))


def test_a_batch_size_below_one_is_refused(pair, batch):
    with pytest.raises(SpeccascadeError, match="batch_size must be >= 1, got 0"):
        SpeculativeCascade(pair).generate(*batch, batch_size=0)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_a_sliding_window_pair_refills_and_decodes_the_same_tokens(joins, family):
    """A sliding window counts slots: joins keep every row's tokens side by side at the layout's end (a longer
    prompt grows the layout at its start), so rows decode as in one batch of all, past the window too."""
    pair = sliding_pair(family)
    ids = torch.randint(3, 64, (6, 9))
    mask = torch.ones_like(ids)
    mask[0, :7] = mask[2, :6] = mask[3, :3] = 0  # a short first batch: the later prompts are longer than its rows
    for temperature in (0.0, 1.0):
        decoder = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=2, temperature=temperature)
        together = decoder.generate(ids, mask, max_new_tokens=10, seed=1)
        assert torch.equal(decoder.generate(ids, mask, max_new_tokens=10, seed=1, batch_size=2).sequences, together.sequences)
    assert joins
