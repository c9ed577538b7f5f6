"""Continuations from many cuts of a few sequences, each cut's prefix read from one shared KV cache.

Outcome labels (:mod:`speccascade.tracing.outcome`) ask the target to finish a reply from many points of it:
keep the reply's first tokens, put another token next, and decode on. Each such prefix is a prefix of the
reply itself, so the model runs once over each whole sequence and every continuation starts from that cache,
the slots past its cut masked out (the decoder masks rejected drafts the same way). A row leaves the batch
once finished (its end-of-sequence token or ``max_new_tokens``), so the longest continuation no longer keeps
finished rows decoding.

The tokens are the ones :class:`~speccascade.decoding.Autoregressive` decodes from the prompt ``prefix +
token``: the same sampler, and for new token ``j`` of a row the same uniform (the row seed's draft stream),
so a row's tokens depend neither on its batch nor on the other cuts decoded with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import SpeccascadeError
from .cache import KVCache, sliding
from .pairs import ModelPair, left_padded
from .sampling import RandomStreams, Sampler, sample
from .state import SHRINK


@dataclass(frozen=True)
class Cut:
    """Continue ``sequences[source]``'s first ``length`` tokens followed by ``token``."""

    source: int
    length: int
    token: int


@dataclass
class Continuations:
    """The new tokens after each cut, in the cuts' order, and the prefix tokens the model ran to get there."""

    tokens: list[list[int]]
    prefill_tokens: int

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


@torch.inference_mode()
def continue_cuts(
    pair: ModelPair,
    sequences: Sequence[Sequence[int]],
    cuts: Sequence[Cut],
    max_new_tokens: int,
    batch_size: int,
    sampler: Sampler,
    seeds: Sequence[int],
) -> Continuations:
    """Decode ``pair``'s target on from every cut, ``batch_size`` cuts at a time (those of the same sequences
    together); row ``i`` samples with ``seeds[i]`` (ignored when greedy)."""
    for cut in cuts:
        if not 0 < cut.length <= len(sequences[cut.source]):
            raise SpeccascadeError(f"a cut keeps {cut.length} tokens of a sequence of {len(sequences[cut.source])}")
    context = pair.context_length
    longest = max((cut.length for cut in cuts), default=0)
    if context is not None and longest + 1 + max_new_tokens > context:
        raise SpeccascadeError(f"a cut of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                               f"context of {context} tokens")
    order = sorted(range(len(cuts)), key=lambda i: (cuts[i].source, cuts[i].length))
    tokens: list[list[int]] = [[] for _ in cuts]
    prefilled = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        new, ran = _continue(pair, sequences, [cuts[i] for i in chunk], max_new_tokens, sampler, [seeds[i] for i in chunk])
        for i, row in zip(chunk, new):
            tokens[i] = row
        prefilled += ran
    return Continuations(tokens, prefilled)


def _continue(pair: ModelPair, sequences: Sequence[Sequence[int]], cuts: list[Cut], max_new_tokens: int,
              sampler: Sampler, seeds: list[int]) -> tuple[list[list[int]], int]:
    """One batch of cuts: run the target over each source once (left-padded to a common width), give every cut
    its source's cache, and decode, dropping finished rows (one host read per step: which rows ended)."""
    device = pair.device
    needed: dict[int, int] = {}  # each source's longest cut: the prefix it runs over
    for cut in cuts:
        needed[cut.source] = max(needed.get(cut.source, 0), cut.length)
    sources = list(needed)
    ids, real = left_padded([sequences[s][: needed[s]] for s in sources], pair.pad_token_id, device)
    width = ids.shape[1]
    cache = KVCache(pair.target, pair.vocab_size)
    cache.forward(ids, (real.cumsum(1) - 1).clamp_min(0), real, logits_to_keep=1)

    # every cut starts from its source's cache; the source's slots past the cut hold other tokens: masked out
    cache.select_rows(torch.tensor([sources.index(cut.source) for cut in cuts], device=device))
    first = torch.tensor([width - needed[cut.source] for cut in cuts], device=device)  # the source's first real slot
    length = torch.tensor([cut.length for cut in cuts], device=device)
    slot = torch.arange(width + max_new_tokens, device=device)
    mask = ((slot >= first[:, None]) & (slot < (first + length)[:, None])) | (slot >= width)  # new slots: all written
    if sliding(pair.target):  # a window counts slots: each cut's kept prefix moves next to its new slots
        order = torch.argsort(mask[:, :width].int(), dim=1, stable=True)
        cache.compact(order)
        mask[:, :width] = mask[:, :width].gather(1, order)
    token = torch.tensor([cut.token for cut in cuts], device=device)[:, None]
    position = length[:, None].clone()  # the fed token's position: one past the kept prefix
    uniforms = None if sampler.greedy else RandomStreams(seeds, max_new_tokens + 2, device).draft
    eos = torch.tensor(pair.eos_token_ids, dtype=torch.long, device=device)

    rows = list(range(len(cuts)))  # the cut each batch row continues
    index = torch.arange(len(cuts), device=device)  # the same, on the device
    new = torch.zeros(len(cuts), max_new_tokens, dtype=torch.long, device=device)
    count = [0] * len(cuts)  # a cut's new tokens once it has ended; 0 while it decodes
    for j in range(max_new_tokens):
        logits = cache.forward(token, position, mask, logits_to_keep=1)[0][:, 0]
        token = logits.argmax(-1) if uniforms is None else sample(sampler(logits), uniforms[index, j])
        new[index, j] = token
        for i, ended in zip(rows, torch.isin(token, eos).tolist()):
            if count[i] == 0 and (ended or j + 1 == max_new_tokens):
                count[i] = j + 1
        keep = [r for r, i in enumerate(rows) if count[i] == 0]
        if not keep:
            break
        token, position = token[:, None], position + 1
        if len(keep) <= SHRINK * len(rows):
            kept = torch.tensor(keep, device=device)
            cache.select_rows(kept)
            rows, index, mask, token, position = [rows[r] for r in keep], index[kept], mask[kept], token[kept], position[kept]
    return [new[i, : count[i]].tolist() for i in range(len(cuts))], int(real.sum())
