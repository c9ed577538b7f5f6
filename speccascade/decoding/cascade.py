"""The speculative-cascade decoder (docs/algorithms.md section 3).

One block step: ``draft`` gamma tokens from ``q~`` (plus one drafter step over the last draft, so
``q_{gamma+1}`` exists for the bonus position), ``verify`` them with one target call, ``accept``
drafts left to right with probability ``min(1, pi(x) / q~(x))``, draw the token after the last
accepted draft from the residual ``norm(max(0, pi - q~))`` (or, when all were accepted, the bonus
from ``pi_{gamma+1}``), and ``rollback`` both caches to the emitted prefix.

When the bonus token never reads ``q_{gamma+1}`` (exact speculative decoding, lossy SD) and no
hook asks for it, the drafter skips that step: its cache then lags one slot behind, which it
re-feeds with the pending token in its next block's first forward (gamma drafter forwards per
block instead of gamma + 1, as transformers' assisted generation does). A rule that decides each
position alone reads ``q_{gamma+1}`` only where a row accepted all gamma drafts, so with the
dynamic cache that step runs after the target's call, and only in blocks where some row did
(``bonus_on_demand``): the same tokens, one drafter forward fewer in every other block.

With ``draft_stop`` > 0 a row's block ends early, after ``k`` drafts (1 <= k <= gamma), at the first
position where the drafter's top-1 probability falls below ``draft_stop``: position ``k + 1`` is then
its bonus position. The stop reads only the drafter's distributions over the row's own prefix, so
every limit of section 6 holds as with fixed blocks; the batch drafts until no active row goes on.

With :class:`~speccascade.deferral.rules.AlwaysDefer` this is exact speculative decoding; with
:class:`~speccascade.deferral.rules.NeverDefer` it is the drafter's own decoding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..deferral.features import EPS
from ..deferral.rules import AlwaysDefer, FLy, Learned, Mix, PositionRule, Rule
from ..errors import SpeccascadeError
from .base import Decoder
from .pairs import ModelPair
from .sampling import Sampler, sample
from .state import DecodeState


@dataclass
class Dists:
    """One model's distributions over a block, computed from its logits when first read: the ``logits``
    ``[B, T, V]`` themselves (the forwards' ``parts`` joined), unscaled ``probs`` (rules) and ``sampled``
    (``q~``/``p~``). Greedy exact speculative decoding reads only the target's logits
    (:meth:`SpeculativeCascade.match_target`), so nothing else is computed."""

    parts: list[torch.Tensor]  # logits [B, t, V] of each forward, in block order
    sampler: Sampler
    steps: list[torch.Tensor] | None = None  # ``q~`` per drafter step, where the drafts were sampled from it
    hidden: torch.Tensor | None = None  # [B, T, H] last-layer hidden states, when asked for

    @functools.cached_property
    def logits(self) -> torch.Tensor:
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, 1)

    @functools.cached_property
    def probs(self) -> torch.Tensor:
        if self.steps is not None and self.sampler.is_identity:
            return self.sampled
        return self.logits.softmax(-1)

    @functools.cached_property
    def sampled(self) -> torch.Tensor:
        if self.steps is not None:
            return torch.cat(self.steps, 1)
        return self.sampler(self.logits, self.probs if self.sampler.is_identity else None)


class Outcome(NamedTuple):
    """How a block ends: accepted drafts ``n`` [B], the token after them [B, 1], the block's ``tokens``
    [B, gamma + 1] (the first ``n + 1`` are emitted) and the rule's ``deferred`` [B, gamma] at each draft."""

    n: torch.Tensor
    next_token: torch.Tensor
    tokens: torch.Tensor
    deferred: torch.Tensor


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
    def hooked(self) -> bool:
        return self.hook is not None

    @property
    def drafter_lag(self) -> int:
        """1 when nothing reads ``q_{gamma+1}``: the drafter then skips its last step of each block."""
        return int((self.bonus == "target" or not self.rule.needs_bonus_drafter) and self.hook is None)

    @property
    def bonus_on_demand(self) -> bool:
        """The drafter's last step waits for the target's call and runs only in blocks where an active row
        accepted all its drafts: the rule decides each position alone (so the block's accepted drafts do
        not depend on ``q_{gamma+1}``), nothing else reads it (no hook, no early-stopping drafts) and the
        dynamic cache reads the host anyway (the static cache's block runs without a host read)."""
        return (not self.drafter_lag and self.hook is None and not self.draft_stop and self.cache == "dynamic"
                and not self.rule.needs_drafts)

    @property
    def wants_hidden(self) -> bool:
        """Hidden states are computed only when the hook or the rule reads them."""
        return self.hook_hidden_states or self.rule.needs_hidden

    @property
    def greedy_exact(self) -> bool:
        """Greedy exact speculative decoding with no hook: the block is settled by :meth:`match_target`."""
        return self.sampler.greedy and isinstance(self.rule, AlwaysDefer) and self.hook is None

    @property
    def greedy_mixture(self) -> bool:
        """Greedy decoding with a position-level mixture rule and no hook: the block is settled by
        :meth:`keep_or_match`."""
        return self.sampler.greedy and is_position_mixture(self.rule) and self.hook is None

    @torch.inference_mode()
    def step(self, state: DecodeState) -> None:
        """One block: draft, verify, accept, resample, emit, rollback."""
        gamma = self.drafts_needed(state)
        state.slots.open(gamma + 1)
        drafts, q, limit, lag = self.draft(state, gamma)
        fed = torch.cat([state.slots.pending, drafts], dim=1)
        p = self.verify(state, fed)
        settle = self.match_target if self.greedy_exact else self.keep_or_match if self.greedy_mixture else self.accept_and_resample
        n, next_token, tokens, deferred = settle(state, drafts, q, p, limit)
        if lag and self.bonus_on_demand and bool((~state.out.done & (n == drafts.shape[1])).any()):
            q, lag = self.draft_bonus(state, drafts, q), 0  # the bonus reads pi_{gamma+1}: settle again with q_{gamma+1}
            n, next_token, tokens, deferred = settle(state, drafts, q, p, limit)
        valid = state.out.emit(tokens, n)  # n + 1, 0 for rows done before the block
        state.out.counts.block(valid, n, limit, deferred, forwards=drafts.shape[1] + 1 - lag)
        self.rollback(state, fed, valid, next_token, lag)

    def mix(self, state: DecodeState, drafts: torch.Tensor, q: Dists, p: Dists, q_s: torch.Tensor, p_s: torch.Tensor) -> Mix:
        """The rule's :class:`Mix` of the block from the models' distributions and ``q_s``, ``p_s`` (``q~``, ``p~``):
        the one place the decoder calls the rule. :class:`AlwaysDefer`'s is known without asking: ``r = 1``
        everywhere, so ``pi = p~`` (exact speculative decoding reads no rule feature)."""
        if isinstance(self.rule, AlwaysDefer):
            return Mix(p_s, p_s, state.out.counts.deferred_everywhere(drafts.shape[1] + 1))
        hidden = {"q_hidden": q.hidden, "p_hidden": p.hidden} if self.rule.needs_hidden else None
        rel_position = rel_positions(drafts.shape[1], self.block_size, drafts.device)
        reply = {"reply_start": state.out.emitted} if self.rule.needs_reply else {}  # reply index of the first draft
        return self.rule.mix(q.probs, p.probs, q_s, p_s, rel_position, hidden, drafts, **reply)

    def accept_and_resample(self, state: DecodeState, drafts: torch.Tensor, q: Dists, p: Dists, limit: torch.Tensor) -> Outcome:
        """The rule's mix of the block, the drafts it accepts and the token drawn after them; the hook sees it all."""
        gamma = drafts.shape[1]
        mix = self.mix(state, drafts, q, p, q.sampled, p.sampled)
        n, accept_prob = self.accept(state, drafts, q.sampled, mix.accept, limit)
        emit = mix.emit
        if self.bonus == "target":
            at_bonus = (torch.arange(gamma + 1, device=drafts.device) == limit.unsqueeze(1)).unsqueeze(-1)
            emit = torch.where(at_bonus, p.sampled, mix.emit)
        next_token = self.resample(state, n, limit, q.sampled, emit)
        next_column = next_token.unsqueeze(1)
        tokens = torch.cat([drafts, drafts[:, :1]], dim=1).scatter(1, n.unsqueeze(1), next_column)
        deferred = self.rule.deferred_at(mix.defer[:, :gamma], drafts)
        if self.hook is not None:
            self.hook(
                BlockEvent(q.probs, p.probs, drafts, deferred, accept_prob, n, next_token,
                           state.out.emitted.clone(), ~state.out.done, q.hidden, p.hidden)
            )
        return Outcome(n, next_column, tokens, deferred)

    def match_target(self, state: DecodeState, drafts: torch.Tensor, q: Dists, p: Dists, limit: torch.Tensor) -> Outcome:
        """Greedy exact speculative decoding: accept drafts while they equal the target's argmax, then emit
        the target's argmax.

        This is :meth:`accept_and_resample` on one-hot ``q~``, ``p~`` with ``pi = p~``: a draft ``x`` (the
        drafter's argmax, ``q~(x) = 1``) is accepted with probability ``p~(x)``, 1 where ``x`` is the
        target's argmax and 0 elsewhere, whatever the uniform; at a rejection the residual
        ``max(0, p~ - q~)`` is ``p~`` (the hot tokens differ), as is the bonus distribution; the draw from
        a one-hot distribution is its hot token. The accepted drafts equal the target's argmaxes, so
        the block's tokens are those (past ``n + 1`` they differ from the general path's, and are never
        emitted). ``tests/decoding/test_greedy.py`` compares both paths on random blocks.
        """
        target = p.logits.argmax(-1)  # [B, gamma + 1]
        gamma = drafts.shape[1]
        n = self.count_accepted(state, drafts == target[:, :gamma], limit)
        return Outcome(n, target.gather(1, n.unsqueeze(1)), target, state.out.counts.deferred_everywhere(gamma))

    def keep_or_match(self, state: DecodeState, drafts: torch.Tensor, q: Dists, p: Dists, limit: torch.Tensor) -> Outcome:
        """Greedy decoding with a position-level mixture rule, ``pi = (1 - r) q~ + r p~``: accept drafts while the
        rule keeps them (``r = 0``) or they equal the target's argmax; after them emit the target's argmax where
        the rule defers and the drafter's where it keeps (with ``bonus="target"``, the target's at the bonus).

        This is :meth:`accept_and_resample` on one-hot ``q~``, ``p~``: a draft ``x`` (``q~(x) = 1``) is accepted
        with probability ``pi(x) = (1 - r) + r p~(x)``, 1 or 0 whatever the uniform. A rejection needs ``r = 1``
        and ``x`` not the target's argmax, where the residual ``max(0, p~ - q~)`` is ``p~``; the bonus
        distribution ``pi`` is ``p~`` or ``q~`` as ``r`` says; a one-hot draw is its hot token. So the block's
        tokens are ``where(r, target argmax, drafter argmax)``, and a draft (the drafter's argmax) is accepted
        where it equals the block's token there. The rule decides on the unscaled ``q``, ``p`` (never on ``q~``,
        ``p~``), so it is asked for ``r`` with width-1 stand-ins for ``q~``, ``p~``: no mixture over the
        vocabulary is built. ``tests/decoding/test_greedy.py`` compares both paths on random blocks.
        """
        gamma = drafts.shape[1]
        r = self.mix(state, drafts, q, p, *stand_ins(drafts.device)).defer  # [B, gamma + 1]
        take_target = r | (state.slots.first(gamma + 1) == limit.unsqueeze(1)) if self.bonus == "target" else r
        tokens = torch.where(take_target, p.logits.argmax(-1), q.logits.argmax(-1))  # the drafts where r = 0
        n = self.count_accepted(state, drafts == tokens[:, :gamma], limit)  # at the bonus position, limit, never read
        return Outcome(n, tokens.gather(1, n.unsqueeze(1)), tokens, r[:, :gamma])

    def count_accepted(self, state: DecodeState, accepted: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
        """``[B]``: the leading drafts ``accepted`` ``[B, gamma]``, up to each row's ``limit``."""
        if self.draft_stop:  # fixed blocks draft gamma everywhere
            accepted = accepted & (state.slots.first(accepted.shape[1]) < limit.unsqueeze(1))
        return accepted.cumprod(1).sum(1)

    def drafts_needed(self, state: DecodeState) -> int:
        """gamma, or fewer where every row is closer than that to ``max_new_tokens`` (tokens past it
        are never emitted). Only in greedy decoding, whose tokens do not depend on where blocks end
        (sampled tokens would use other random draws; a block rule's look-ahead reads drafts past the
        cut; a bonus from ``p`` would replace ``pi``'s token at the cut under a rule other than forced
        defer), and where shapes may change: the dynamic cache, no hook reading blocks. The count left
        is the one the last rollback read on the host."""
        bonus_from_p = self.bonus == "target" and not isinstance(self.rule, AlwaysDefer)
        if self.cache == "static" or self.hook is not None or not self.sampler.greedy or self.rule.needs_drafts or bonus_from_p:
            return self.block_size
        return max(1, min(self.block_size, state.out.left - 1))

    def draft(self, state: DecodeState, gamma: int) -> tuple[torch.Tensor, Dists, torch.Tensor, int]:
        """Up to gamma drafts from ``q~``, the drafter's distributions at one position more, each row's
        draft count (``limit``, [B]: gamma unless ``draft_stop`` ended the row's block) and the drafter's lag.

        Per step only the forward and the draw run (greedy: the argmax, which is the draw from the one-hot
        ``q~``); the distributions are computed once over the block's logits. Without the last step
        (``drafter_lag``, or until :meth:`draft_bonus` runs it) the bonus-position distribution is a copy of
        ``q_gamma``, which nothing reads.
        """
        slots, out, greedy, wants_hidden = state.slots, state.out, self.sampler.greedy, self.wants_hidden
        block, drafter = slots.block, slots.caches["drafter"]
        columns = block.positions.split(1, dim=1)  # each step's [B, 1] positions
        x, positions = slots.catch_up("drafter", slots.pending, columns[0])
        limit = state.filled(gamma)
        u = None if greedy else state.streams.draft.gather(1, out.emitted_column + slots.first(gamma)).split(1, dim=1)
        drafts, logits, sampled, hidden = [], [], [], []
        for i in range(gamma + 1 - (self.drafter_lag or self.bonus_on_demand)):
            step_logits, h = drafter.forward(x, positions, block.window, wants_hidden, logits_to_keep=1)
            logits.append(step_logits), hidden.append(h)
            sampled.append(None if greedy else self.sampler(step_logits))
            if 0 < i < gamma and self.draft_stop:
                top1 = step_logits[:, -1].softmax(-1).max(-1).values
                limit = torch.where((limit == gamma) & (top1 < self.draft_stop), i, limit)
                if not bool((~out.done & (limit == gamma)).any()):
                    break
            if i < gamma:
                token = step_logits.argmax(-1) if greedy else sample(sampled[-1], u[i])  # [B, 1]
                drafts.append(token)
                x, positions = token, columns[i + 1]
        out.counts.forwards["drafter"] += len(logits)
        lag = len(drafts) + 1 - len(logits)
        if lag:
            logits.append(logits[-1]), sampled.append(sampled[-1]), hidden.append(hidden[-1])
        q_hidden = torch.cat(hidden, dim=1).float() if wants_hidden else None
        drafts = torch.cat(drafts, 1)
        q = Dists(logits, self.sampler, None if greedy else sampled, q_hidden)
        return drafts, q, limit.clamp_max(drafts.shape[1]) if self.draft_stop else limit, lag  # fixed blocks draft gamma

    def draft_bonus(self, state: DecodeState, drafts: torch.Tensor, q: Dists) -> Dists:
        """``q`` with ``q_{gamma+1}`` in place of its stand-in: the drafter's step over the last draft, which
        :meth:`draft` skipped (``bonus_on_demand``); the drafter's cache then lags no slot behind."""
        gamma, block = drafts.shape[1], state.slots.block
        step_logits, h = state.slots.caches["drafter"].forward(
            drafts[:, -1:], block.positions[:, gamma : gamma + 1], block.window, self.wants_hidden, logits_to_keep=1)
        state.out.counts.forwards["drafter"] += 1
        sampled = None if q.steps is None else [*q.steps[:-1], self.sampler(step_logits)]
        hidden = None if q.hidden is None else torch.cat([q.hidden[:, :-1], h.float()], 1)
        return Dists([*q.parts[:-1], step_logits], self.sampler, sampled, hidden)

    def verify(self, state: DecodeState, fed: torch.Tensor) -> Dists:
        """One target call over ``fed``, the pending token and the drafts: ``p_1 .. p_{gamma+1}``."""
        slots, n = state.slots, fed.shape[1]
        positions = slots.block.positions
        ids, positions = slots.catch_up("target", fed, positions if positions.shape[1] == n else positions[:, :n])
        logits, hidden = slots.caches["target"].forward(ids, positions, slots.block.window, self.wants_hidden, logits_to_keep=n)
        state.out.counts.forwards["target"] += 1
        return Dists([logits], self.sampler, hidden=hidden.float() if hidden is not None else None)

    def accept(
        self, state: DecodeState, drafts: torch.Tensor, q_s: torch.Tensor, accept: torch.Tensor, limit: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accept each of a row's first ``limit`` drafts with ``min(1, accept(x) / q~(x))``; return leading accepts
        ``n`` and the probabilities."""
        gamma = drafts.shape[1]
        x = drafts.unsqueeze(-1)  # gathers read the first gamma positions of the gamma + 1
        accept_prob = (accept.gather(-1, x) / q_s.gather(-1, x).clamp_min(EPS)).clamp_max(1.0).squeeze(-1)
        accepted = state.streams.accept.gather(1, state.out.emitted_column + state.slots.first(gamma)) < accept_prob
        return self.count_accepted(state, accepted, limit), accept_prob

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

    def rollback(self, state: DecodeState, fed: torch.Tensor, valid: torch.Tensor, next_token: torch.Tensor,
                 lag: int) -> None:
        """Keep each row's pending token and accepted drafts (the first ``valid`` of ``fed``) in both caches;
        mask the rest out.

        Both caches drop the same count: a drafter that skipped its last step holds one slot less
        before the rollback and lags one slot behind after it. With the dynamic cache the count kept,
        the tokens still to emit and the rows still decoding are read on the host together: the block's one
        wait for the device.
        """
        slots, out = state.slots, state.out
        if self.cache == "dynamic":  # read on the host: a few ints, one operator less
            valid_h, room_h = torch.stack([valid, out.room]).tolist()
            kept = max(valid_h)
            out.read(room_h)
        else:
            kept = valid.max()
        slots.rollback(fed.shape[1], kept)
        slots.behind["drafter"] = lag
        slots.advance(fed, valid, kept, next_token)


@functools.lru_cache(maxsize=64)
def rel_positions(gamma: int, block_size: int, device: torch.device) -> torch.Tensor:
    """``[gamma + 1]``: each block position's (index + 1) / block size, capped at 1 (built once per shape)."""
    with torch.inference_mode():
        return ((torch.arange(gamma + 1, device=device) + 1) / block_size).clamp_max(1.0)


@functools.lru_cache(maxsize=8)
def stand_ins(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros ``[1, 1, 1]`` standing for ``q~``, ``p~`` where only a position rule's ``r`` is read (built once per device)."""
    with torch.inference_mode():
        zero = torch.zeros(1, 1, 1, device=device)
        return zero, zero


def is_position_mixture(rule: Rule) -> bool:
    """Whether ``rule`` decides per position and mixes ``pi = (1 - r) q~ + r p~`` (its :class:`Mix` is that
    ``pi`` and ``r`` ``[B, T]``): the position rules, FLy and position-level learned heads, not lossy SD."""
    return isinstance(rule, (PositionRule, FLy)) or isinstance(rule, Learned) and rule.granularity == "position"


def check_draft_stop(draft_stop: float, cache: str | None, hook: Hook | None) -> None:
    """``draft_stop`` is a probability in [0, 1), read on the host after every drafter step: it needs the
    dynamic cache and no hook."""
    if not 0.0 <= draft_stop < 1.0:
        raise SpeccascadeError(f"draft_stop must lie in [0, 1), got {draft_stop}")
    if draft_stop and cache == "static":
        raise SpeccascadeError("draft_stop needs the dynamic cache (cache='dynamic'): blocks change length")
    if draft_stop and hook is not None:
        raise SpeccascadeError("draft_stop cannot run with a hook, which reads whole blocks of gamma drafts")
