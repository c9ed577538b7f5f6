"""Finished rows leave the batch (``Decoder.drops_rows``): every decoder emits the same tokens and counts the same
per-row statistics as when they stay, while its forwards run over fewer rows; a hook or the static cache keeps
every row."""

from __future__ import annotations

import json
import pytest
import torch

from speccascade.decoding import Autoregressive, SequentialCascade, SpeculativeCascade, base
from speccascade.decoding.cache import KVCache
from speccascade.deferral import rules

MAX_NEW = 14
DECODERS = {
    "target alone": lambda pair, t: Autoregressive(pair, "target", temperature=t),
    "exact": lambda pair, t: SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3, temperature=t),
    "opt": lambda pair, t: SpeculativeCascade(pair, rules.OPT(alpha=0.3), block_size=3, temperature=t),
    "sequential chow": lambda pair, t: SequentialCascade(pair, rules.Chow(alpha=0.5), temperature=t),
}


@pytest.fixture
def batch_sizes(monkeypatch):
    """The batch size of every forward the decoders run."""
    sizes: list[int] = []
    forward = KVCache.forward
    monkeypatch.setattr(KVCache, "forward", lambda self, ids, *a, **k: sizes.append(len(ids)) or forward(self, ids, *a, **k))
    return sizes


def _stats(out) -> str:
    """Every statistic but the clock's, as JSON (NaN, where nothing was drafted, equals itself there)."""
    return json.dumps({k: v for k, v in out.stats.as_dict().items() if k not in ("wall_s", "tokens_per_s")}, sort_keys=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "T=1"])
@pytest.mark.parametrize("name", DECODERS)
def test_rows_leave_the_batch_and_change_nothing(pair, ragged, batch_sizes, monkeypatch, name, temperature):
    ids, mask = ragged
    dropping = DECODERS[name](pair, temperature).generate(ids, mask, max_new_tokens=MAX_NEW, seed=5)
    seen = list(batch_sizes)
    monkeypatch.setattr(base, "SHRINK", 0.0)  # every row stays until the last has finished
    batch_sizes.clear()
    staying = DECODERS[name](pair, temperature).generate(ids, mask, max_new_tokens=MAX_NEW, seed=5)
    lengths = [row["new_tokens"] for row in staying.stats.rows]
    assert min(lengths) < MAX_NEW and len(set(lengths)) > 2  # rows ended at different steps
    assert torch.equal(dropping.sequences, staying.sequences)
    assert _stats(dropping) == _stats(staying)  # per-row counters in the batch's order, forwards, acceptance
    assert set(batch_sizes) == {len(ids)}
    assert seen[0] == len(ids) and seen == sorted(seen, reverse=True) and seen[-1] < len(ids)
    # a row leaves once at most three quarters of its batch still decode
    assert all(size <= 0.75 * earlier for earlier, size in zip(seen, seen[1:]) if size < earlier)


@pytest.mark.parametrize("keeps", ["hook", "static cache"])
def test_a_hook_or_the_static_cache_keeps_every_row(pair, ragged, batch_sizes, keeps):
    """A hook sees every row in every block; the static cache's shapes are fixed (it selects no rows)."""
    ids, mask = ragged
    events = []
    extra = {"hook": events.append} if keeps == "hook" else {"cache": "static"}
    cascade = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3, **extra)
    out = cascade.generate(ids, mask, max_new_tokens=MAX_NEW)
    assert not cascade.drops_rows
    assert min(row["new_tokens"] for row in out.stats.rows) < MAX_NEW
    assert set(batch_sizes) == {len(ids)}
    assert all(len(event.drafts) == len(ids) for event in events)
