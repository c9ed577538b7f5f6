"""Continuations from shared prefixes (outcome labels' decoding): each cut continues as the target decoding alone
from ``prefix + token`` would, greedy and sampled, while finished rows leave the batch."""

from __future__ import annotations

import collections

import pytest
import torch

from speccascade.decoding import Autoregressive, Sampler, continuations
from speccascade.decoding.cache import KVCache
from speccascade.decoding.continuations import Cut, continue_cuts
from speccascade.errors import SpeccascadeError
from tests.helpers import sliding_pair

MAX_NEW = 16


def _sequences(pair) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, pair.vocab_size, (n,), generator=g).tolist() for n in (7, 12, 19)]


def _cuts(pair, sequences) -> list[Cut]:
    g = torch.Generator().manual_seed(1)
    pick = lambda high: int(torch.randint(1, high, (1,), generator=g))  # noqa: E731
    return [Cut(s, pick(len(sequences[s]) + 1), pick(pair.vocab_size)) for s in (0, 1, 2, 0, 1, 2, 2, 1, 0, 2)]


def _alone(pair, sequences, cut, sampler, seed) -> list[int]:
    prompt = torch.tensor([sequences[cut.source][: cut.length] + [cut.token]])
    out = Autoregressive(pair, "target", sampler.temperature, sampler.top_k, sampler.top_p).generate(
        prompt, max_new_tokens=MAX_NEW, seed=[seed])
    return out.new_tokens[0, : out.stats.rows[0]["new_tokens"]].tolist()


@pytest.fixture
def frequent_eos(pair):
    """Makes the target's most frequent continuation token its end of sequence, so rows end at different steps."""
    sequences, cuts = _sequences(pair), _cuts(pair, _sequences(pair))
    free = [_alone(pair, sequences, cut, Sampler(0.0), 0) for cut in cuts]
    pair.target.generation_config.eos_token_id = collections.Counter(t for f in free for t in f).most_common(1)[0][0]
    yield
    pair.target.generation_config.eos_token_id = 2


@pytest.mark.parametrize("sampler", [Sampler(0.0), Sampler(1.0), Sampler(0.8, top_k=20, top_p=0.9)], ids=repr)
def test_each_cut_continues_as_the_model_decoding_alone_from_it(pair, frequent_eos, sampler):
    sequences, cuts = _sequences(pair), _cuts(pair, _sequences(pair))
    seeds = list(range(100, 100 + len(cuts)))
    found = continue_cuts(pair, sequences, cuts, MAX_NEW, 4, sampler, seeds)
    alone = [_alone(pair, sequences, cut, sampler, seed) for cut, seed in zip(cuts, seeds)]
    assert found.tokens == alone
    assert {len(t) < MAX_NEW for t in alone} == {True, False}  # some rows ended early, some ran to the limit
    assert found.new_tokens == sum(map(len, alone))
    # each batch runs each of its sources once, up to its longest cut, not every cut's prefix
    assert found.prefill_tokens < sum(cut.length for cut in cuts)


def test_finished_rows_leave_the_batch(pair, frequent_eos, monkeypatch):
    rows = []  # the batch size of every one-token forward
    forward = KVCache.forward
    monkeypatch.setattr(KVCache, "forward", lambda self, ids, *a, **k: (rows.append(len(ids)) if ids.shape[1] == 1 else None)
                        or forward(self, ids, *a, **k))
    sequences, cuts = _sequences(pair), _cuts(pair, _sequences(pair))
    found = continue_cuts(pair, sequences, cuts, MAX_NEW, len(cuts), Sampler(0.0), [0] * len(cuts))
    assert rows[0] == len(cuts) and rows == sorted(rows, reverse=True) and rows[-1] < len(cuts)
    # a row decodes at most until a quarter of the batch decoding with it has finished
    assert sum(rows) < len(cuts) * max(map(len, found.tokens))
    monkeypatch.setattr(continuations, "SHRINK", 0.0)  # never dropping rows decodes the same tokens
    assert continue_cuts(pair, sequences, cuts, MAX_NEW, len(cuts), Sampler(0.0), [0] * len(cuts)).tokens == found.tokens


@pytest.mark.parametrize("length, message", [(0, "a cut keeps 0 tokens of a sequence of 7"),
                                             (8, "a cut keeps 8 tokens of a sequence of 7")])
def test_a_cut_outside_its_sequence_is_refused(pair, length, message):
    with pytest.raises(SpeccascadeError, match=message):
        continue_cuts(pair, _sequences(pair), [Cut(0, length, 5)], MAX_NEW, 4, Sampler(0.0), [0])


def test_a_cut_past_the_context_is_refused(pair):
    sequences = _sequences(pair)
    with pytest.raises(SpeccascadeError, match="exceeds the model's context"):
        continue_cuts(pair, sequences, [Cut(2, 19, 5)], pair.context_length, 4, Sampler(0.0), [0])


@pytest.mark.parametrize("sampler", [Sampler(0.0), Sampler(1.0)], ids=repr)
def test_a_sliding_window_target_continues_each_cut_as_it_decodes_alone(sampler):
    """A sliding window counts slots: each cut's kept prefix moves next to its new slots (the source's slots past
    the cut would otherwise sit in its window), so every cut continues as the target alone, past the window too."""
    pair = sliding_pair()
    g = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (9, 25, 40)]
    cuts = [Cut(s, int(torch.randint(1, len(sequences[s]) + 1, (1,), generator=g)), int(torch.randint(3, 64, (1,), generator=g)))
            for s in [0, 1, 2] * 6]
    seeds = list(range(len(cuts)))
    found = continue_cuts(pair, sequences, cuts, 12, 6, sampler, seeds)
    assert found.tokens == [_alone(pair, sequences, cut, sampler, seed)[:12] for cut, seed in zip(cuts, seeds)]
