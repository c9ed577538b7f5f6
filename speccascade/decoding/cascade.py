"""The speculative-cascade decoder (docs/algorithms.md section 3).

One block step: ``draft`` gamma tokens from ``q~`` (plus one drafter step over the last draft, so
``q_{gamma+1}`` exists for the bonus position), ``verify`` them with one target call, ``accept``
drafts left to right with probability ``min(1, pi(x) / q~(x))``, draw the token after the last
accepted draft from the residual ``norm(max(0, pi - q~))`` (or, when all were accepted, the bonus
from ``pi_{gamma+1}``), and ``rollback`` both caches to the emitted prefix.

When the bonus token never reads ``q_{gamma+1}`` (exact speculative decoding, lossy SD) and no
hook asks for it, the drafter skips that step: its cache then lags one slot behind, which it
re-feeds with the pending token in its next block's first forward (gamma drafter forwards per
block instead of gamma + 1, as transformers' assisted generation does).

With ``draft_stop`` > 0 a row's block ends early, after ``k`` drafts (1 <= k <= gamma), at the first
position where the drafter's top-1 probability falls below ``draft_stop``: position ``k + 1`` is then
its bonus position. The stop reads only the drafter's distributions over the row's own prefix, so
every limit of section 6 holds as with fixed blocks; the batch drafts until no active row goes on.

With :class:`~speccascade.deferral.rules.AlwaysDefer` this is exact speculative decoding; with
:class:`~speccascade.deferral.rules.NeverDefer` it is the drafter's own decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..deferral.features import EPS
from ..deferral.rules import AlwaysDefer, Rule
from ..errors import SpeccascadeError
from .base import Decoder
from .pairs import ModelPair
from .sampling import sample
from .state import DecodeState


class Dists(NamedTuple):
    """One model's distributions over a block: unscaled ``probs`` (rules) and ``sampled`` (``q~``/``p~``)."""

    probs: torch.Tensor  # [B, T, V]
    sampled: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor | None  # [B, T, H] last-layer hidden states, when asked for


@dataclass
class BlockEvent:
    """What a hook sees after each block, for every row (inactive rows included; see ``active``).

    Positions ``t < gamma`` are drafted positions; index ``gamma`` is the bonus position.
    """

    q: torch.Tensor  # [B, gamma + 1, V] drafter probabilities (T = 1)
    p: torch.Tensor  # [B, gamma + 1, V] target probabilities (T = 1)
    drafts: torch.Tensor  # [B, gamma]
    deferred: torch.Tensor  # [B, gamma] bool, the rule's r at each draft
    accept_prob: torch.Tensor  # [B, gamma]
    n_accepted: torch.Tensor  # [B]
    next_token: torch.Tensor  # [B] residual or bonus token
    out_index: torch.Tensor  # [B] output index of the first draft
    active: torch.Tensor  # [B] rows still decoding when the block started
    q_hidden: torch.Tensor | None = None  # [B, gamma + 1, H]
    p_hidden: torch.Tensor | None = None


Hook = Callable[[BlockEvent], None]
BONUS = ("mix", "target")  # the bonus token's distribution: pi_{gamma+1} (algorithms.md section 3) or p~_{gamma+1}


class SpeculativeCascade(Decoder):
    """Speculative cascade over ``pair`` with a deferral ``rule`` and block size gamma.

    Rules decide on the unscaled (T = 1) probabilities; mixing, accepting and resampling use the
    temperature / top-k / top-p sampling distributions of both models (as the paper's colab does).
    ``hook`` is called with a :class:`BlockEvent` after every block (the trace logger's entry
    point); ``hook_hidden_states`` also passes both models' last hidden states. ``bonus="target"``
    draws the bonus token of a fully accepted block from the target's ``p~_{gamma+1}`` instead of
    ``pi_{gamma+1}``: the drafter then skips its last step in every block (one drafter step per
    block saved; forced defer is unchanged, never defer no longer equals the drafter alone).
    ``draft_stop`` (0: off) ends a row's block where the drafter's top-1 probability falls below it
    (gamma is then the longest block); it reads the host after every drafter step, so it runs with
    the dynamic cache and without a hook (which sees whole blocks).
    """

    def __init__(
        self,
        pair: ModelPair,
        rule: Rule | None = None,
        block_size: int = 5,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        hook: Hook | None = None,
        hook_hidden_states: bool = False,
        cache: str | None = None,
        compile: bool = False,
        bonus: str = "mix",
        draft_stop: float = 0.0,
    ) -> None:
        check_draft_stop(draft_stop, cache, hook)
        super().__init__(pair, temperature, top_k, top_p, cache or ("dynamic" if draft_stop else None), compile)
        if block_size < 1:
            raise SpeccascadeError(f"block_size (gamma) must be >= 1, got {block_size}")
        if bonus not in BONUS:
            raise SpeccascadeError(f"bonus must be one of {', '.join(BONUS)}, got {bonus!r}")
        self.bonus = bonus
        self.draft_stop = draft_stop
        self.rule = rule if rule is not None else AlwaysDefer()
        self.block_size = block_size
        self.hook = hook
        self.hook_hidden_states = hook_hidden_states

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {"drafter": self.pair.drafter, "target": self.pair.target}

    @property
    def drafter_lag(self) -> int:
        """1 when nothing reads ``q_{gamma+1}``: the drafter then skips its last step of each block."""
        return int((self.bonus == "target" or not self.rule.needs_bonus_drafter) and self.hook is None)

    @property
    def wants_hidden(self) -> bool:
        """Hidden states are computed only when the hook or the rule reads them."""
        return self.hook_hidden_states or self.rule.needs_hidden

    @torch.inference_mode()
    def step(self, state: DecodeState) -> None:
        """One block: draft, verify, accept, resample, rollback."""
        gamma = self.drafts_needed(state)
        active = ~state.out.done
        state.slots.reserve(gamma + 1)
        drafts, q, limit, lag = self.draft(state, gamma, active)
        gamma = drafts.shape[1]
        p = self.verify(state, drafts)
        rel_position = ((torch.arange(gamma + 1, device=drafts.device) + 1) / self.block_size).clamp_max(1.0)
        hidden = {"q_hidden": q.hidden, "p_hidden": p.hidden} if self.rule.needs_hidden else None
        mix = self.rule.mix(q.probs, p.probs, q.sampled, p.sampled, rel_position, hidden, drafts)
        n, accept_prob = self.accept(state, drafts, q.sampled, mix.accept, limit)
        at_bonus = (torch.arange(gamma + 1, device=drafts.device) == limit.unsqueeze(1)).unsqueeze(-1)
        emit = mix.emit if self.bonus == "mix" else torch.where(at_bonus, p.sampled, mix.emit)
        next_token = self.resample(state, n, limit, q.sampled, emit)

        tokens = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, n.unsqueeze(1), next_token.unsqueeze(1))
        deferred = self.rule.deferred_at(mix.defer[:, :gamma], drafts)
        self.count(state, active, n, limit, deferred, forwards=gamma + 1 - lag)
        if self.hook is not None:
            self.hook(
                BlockEvent(q.probs, p.probs, drafts, deferred, accept_prob, n, next_token,
                           state.out.emitted.clone(), active, q.hidden, p.hidden)
            )
        state.out.emit(tokens, n + 1)
        self.rollback(state, drafts, torch.where(active, n + 1, 0), next_token, lag)

    def drafts_needed(self, state: DecodeState) -> int:
        """gamma, or fewer where every row is closer than that to ``max_new_tokens`` (tokens past it
        are never emitted). Only in greedy decoding, whose tokens do not depend on where blocks end
        (sampled tokens would use other random draws; a block rule's look-ahead reads drafts past the
        cut), and where shapes may change and the host may read the device: the dynamic cache, no hook
        reading blocks."""
        if self.cache == "static" or self.hook is not None or not self.sampler.greedy or self.rule.needs_drafts:
            return self.block_size
        out = state.out
        left = int(torch.where(out.done, 0, out.max_new_tokens - out.emitted).max())
        return max(1, min(self.block_size, left - 1))

    def draft(self, state: DecodeState, gamma: int, active: torch.Tensor) -> tuple[torch.Tensor, Dists, torch.Tensor, int]:
        """Up to gamma drafts from ``q~``, the drafter's distributions at one position more, each row's
        draft count (``limit``, [B]: gamma unless ``draft_stop`` ended the row's block) and the drafter's lag.

        Without the last step (``drafter_lag``) the bonus-position distribution is a copy of
        ``q_gamma``, which nothing reads.
        """
        slots = state.slots
        window = slots.window(gamma + 1)
        x, positions = slots.catch_up("drafter", slots.pending.unsqueeze(1), slots.pos.unsqueeze(1))
        limit = torch.full_like(state.out.emitted, gamma)
        drafts, probs, sampled, hidden = [], [], [], []
        for i in range(gamma + 1 - self.drafter_lag):
            logits, h = slots.caches["drafter"].forward(x, positions, window, self.wants_hidden, logits_to_keep=1)
            q = logits[:, -1].softmax(-1)
            q_s = self.sampler(logits[:, -1], q)
            probs.append(q), sampled.append(q_s), hidden.append(h)
            if 0 < i < gamma and self.draft_stop:
                limit = torch.where((limit == gamma) & (q.max(-1).values < self.draft_stop), i, limit)
                if not bool((active & (limit == gamma)).any()):
                    break
            if i < gamma:
                token = sample(q_s, state.streams.draft[state.rows, state.out.emitted + i])
                drafts.append(token)
                x, positions = token.unsqueeze(1), (slots.pos + i + 1).unsqueeze(1)
        state.out.counts.forwards["drafter"] += len(probs)
        lag = len(drafts) + 1 - len(probs)
        if lag:
            probs.append(probs[-1]), sampled.append(sampled[-1]), hidden.append(hidden[-1])
        q_hidden = torch.cat(hidden, dim=1).float() if self.wants_hidden else None
        drafts = torch.stack(drafts, 1)
        return drafts, Dists(torch.stack(probs, 1), torch.stack(sampled, 1), q_hidden), limit.clamp_max(drafts.shape[1]), lag

    def verify(self, state: DecodeState, drafts: torch.Tensor) -> Dists:
        """One target call over the pending token and the drafts: ``p_1 .. p_{gamma+1}``."""
        slots, gamma = state.slots, drafts.shape[1]
        ids = torch.cat([slots.pending.unsqueeze(1), drafts], dim=1)
        positions = slots.pos.unsqueeze(1) + torch.arange(gamma + 1, device=ids.device)
        ids, positions = slots.catch_up("target", ids, positions)
        logits, hidden = slots.caches["target"].forward(ids, positions, slots.window(gamma + 1), self.wants_hidden,
                                                        logits_to_keep=gamma + 1)
        state.out.counts.forwards["target"] += 1
        p = logits.softmax(-1)
        return Dists(p, self.sampler(logits, p), hidden.float() if hidden is not None else None)

    def accept(
        self, state: DecodeState, drafts: torch.Tensor, q_s: torch.Tensor, accept: torch.Tensor, limit: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accept each of a row's first ``limit`` drafts with ``min(1, accept(x) / q~(x))``; return leading accepts
        ``n`` and the probabilities."""
        gamma = drafts.shape[1]
        x = drafts.unsqueeze(-1)
        q_x = q_s[:, :gamma].gather(-1, x).squeeze(-1)
        a_x = accept[:, :gamma].gather(-1, x).squeeze(-1)
        accept_prob = (a_x / q_x.clamp_min(EPS)).clamp_max(1.0)
        offsets = torch.arange(gamma, device=drafts.device)
        index = state.out.emitted.unsqueeze(1) + offsets
        accepted = (state.streams.accept.gather(1, index) < accept_prob) & (offsets < limit.unsqueeze(1))
        n = accepted.long().cumprod(1).sum(1)
        return n, accept_prob

    def resample(
        self, state: DecodeState, n: torch.Tensor, limit: torch.Tensor, q_s: torch.Tensor, emit: torch.Tensor
    ) -> torch.Tensor:
        """The token after the ``n`` accepted drafts: residual ``norm(max(0, pi - q~))``, or the bonus ``pi`` where
        all of the row's ``limit`` drafts were accepted."""
        rows = state.rows
        rejected = n < limit
        pi_n, q_n = emit[rows, n], q_s[rows, n]
        residual = (pi_n - q_n * rejected.unsqueeze(1)).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pi_n)
        index = state.out.emitted + n
        u = torch.where(rejected, state.streams.resample[rows, index], state.streams.draft[rows, index])
        return sample(residual, u)

    def count(self, state: DecodeState, active: torch.Tensor, n: torch.Tensor, limit: torch.Tensor,
              deferred: torch.Tensor, forwards: int) -> None:
        """Add a block to each active row's counters; ``forwards``: the drafter steps the batch ran."""
        gamma, counts = deferred.shape[1], state.out.counts
        a = active.long()
        offsets = torch.arange(gamma, device=n.device)
        examined = (offsets <= n.unsqueeze(1)) & (offsets < limit.unsqueeze(1))  # accepted drafts, the first rejected one
        counts.add("target_calls", a)
        counts.add("drafter_calls", a * forwards)
        counts.add("drafted", a * limit)
        counts.add("accepted", a * n)
        counts.add("decided", a * examined.sum(1))
        counts.add("deferrals", a * (deferred & examined).sum(1))
        counts.add("rejections", a * (n < limit).long())
        counts.reached_at[:, :gamma] += a.unsqueeze(1) * examined
        counts.accepted_at[:, :gamma] += a.unsqueeze(1) * (offsets < n.unsqueeze(1))

    def rollback(self, state: DecodeState, drafts: torch.Tensor, valid: torch.Tensor, next_token: torch.Tensor,
                 lag: int) -> None:
        """Keep each row's pending token and accepted drafts in both caches; mask the rest out.

        Both caches drop the same count: a drafter that skipped its last step holds one slot less
        before the rollback and lags one slot behind after it.
        """
        slots = state.slots
        fed = torch.cat([slots.pending.unsqueeze(1), drafts], dim=1)
        kept = slots.rollback(fed.shape[1], valid)
        slots.behind["drafter"] = lag
        slots.advance(fed, valid, kept, next_token)


def check_draft_stop(draft_stop: float, cache: str | None, hook: Hook | None) -> None:
    """``draft_stop`` is a probability in [0, 1), read on the host after every drafter step: it needs the
    dynamic cache and no hook."""
    if not 0.0 <= draft_stop < 1.0:
        raise SpeccascadeError(f"draft_stop must lie in [0, 1), got {draft_stop}")
    if draft_stop and cache == "static":
        raise SpeccascadeError("draft_stop needs the dynamic cache (cache='dynamic'): blocks change length")
    if draft_stop and hook is not None:
        raise SpeccascadeError("draft_stop cannot run with a hook, which reads whole blocks of gamma drafts")
