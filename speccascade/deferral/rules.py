"""Deferral rules: decide, per drafted position (or per candidate token), whether to defer to the target.

Every rule follows algorithms.md section 4. Decisions are taken on the *unscaled* (T = 1)
probabilities ``q``, ``p``; the mixture ``pi`` is built from the sampling distributions ``q_s``
(``q~``) and ``p_s`` (``p~``), as the paper's official colab does. All tensors are ``[B, T, V]``
(batch, block position, vocabulary) and every rule is vectorised over all three axes.

A rule turns one block into a :class:`Mix`: the decoder accepts a draft ``x`` with probability
``min(1, accept(x) / q~(x))``, draws a rejected position's token from ``norm(max(0, emit - q~))``
and the bonus token from ``emit``. For the cascaded rules ``accept = emit = pi``.

Each rule class names its knob (``alpha``, or ``k`` for :class:`TopK`) and, in ``EXACT`` and
``DRAFTER_ONLY``, a knob value at which it is exact speculative decoding and one at which it
accepts every draft.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..errors import SpeccascadeError
from .features import EPS, max_prob, tv_distance


class Mix(NamedTuple):
    """A rule's verdict on one block (see the module docstring)."""

    accept: torch.Tensor  # [B, T, V]
    emit: torch.Tensor  # [B, T, V]
    defer: torch.Tensor  # bool, [B, T] (position-level) or [B, T, V] (token-level)


class Rule(ABC):
    """A deferral rule. ``r = 1`` (True) means defer to the target."""

    name: ClassVar[str]
    granularity: ClassVar[str]  # "position" or "token"
    needs_target: ClassVar[bool] = True  # False: decides from q alone (sequential cascade)
    knob: ClassVar[str | None] = "alpha"
    EXACT: ClassVar[float | None] = None
    DRAFTER_ONLY: ClassVar[float | None] = None

    @property
    def spec(self) -> str:
        """The command-line spelling (``opt:0.3``) that :func:`parse` reads back."""
        return self.name if self.knob is None else f"{self.name}:{getattr(self, self.knob):g}"

    @abstractmethod
    def mix(self, q: torch.Tensor, p: torch.Tensor, q_s: torch.Tensor, p_s: torch.Tensor) -> Mix:
        """The block's :class:`Mix` from unscaled ``q``, ``p`` and sampling ``q_s``, ``p_s``."""

    @staticmethod
    def deferred_at(defer: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``r`` at the given tokens ``[B, T]``: the decision that applied to each draft."""
        if defer.dim() == tokens.dim():
            return defer
        return defer.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class PositionRule(Rule):
    """One decision per position: ``pi = (1 - r) q~ + r p~``."""

    granularity = "position"

    @abstractmethod
    def defer(self, q: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        """Boolean ``r`` ``[B, T]`` from unscaled ``q`` (and ``p`` when ``needs_target``)."""

    def mix(self, q, p, q_s, p_s) -> Mix:
        r = self.defer(q, p)
        pi = torch.where(r.unsqueeze(-1), p_s, q_s)
        return Mix(pi, pi, r)


class TokenRule(Rule):
    """One decision per candidate token: ``pi(v) = q~(v) (1 - r(v)) + p~(v) eta``.

    ``eta = sum_u r(u) q~(u)`` is summed over the whole vocabulary.
    """

    granularity = "token"

    @abstractmethod
    def defer_tokens(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Boolean ``r(v)`` ``[B, T, V]``."""

    def mix(self, q, p, q_s, p_s) -> Mix:
        r = self.defer_tokens(q, p)
        deferred_q = torch.where(r, q_s, 0.0)
        eta = deferred_q.sum(-1, keepdim=True)
        pi = (q_s - deferred_q) + p_s * eta
        return Mix(pi, pi, r)


@dataclass
class AlwaysDefer(PositionRule):
    """``r = 1`` everywhere: exact speculative decoding (the target alone in the sequential cascade)."""

    name = "always"
    needs_target = False
    knob = None

    def defer(self, q, p):
        return torch.ones(q.shape[:-1], dtype=torch.bool, device=q.device)


@dataclass
class NeverDefer(PositionRule):
    """``r = 0`` everywhere: the drafter's own decoding, every draft accepted."""

    name = "never"
    needs_target = False
    knob = None

    def defer(self, q, p):
        return torch.zeros(q.shape[:-1], dtype=torch.bool, device=q.device)


@dataclass
class Chow(PositionRule):
    """Defer iff ``max q < 1 - alpha`` (the drafter is unsure)."""

    alpha: float = 0.5
    name = "chow"
    needs_target = False
    EXACT = -0.1
    DRAFTER_ONLY = 1.0

    def defer(self, q, p):
        return max_prob(q) < 1 - self.alpha


@dataclass
class Diff(PositionRule):
    """Defer iff ``max q < max p - alpha`` (the target is surer by a margin)."""

    alpha: float = 0.0
    name = "diff"
    EXACT = -1.1
    DRAFTER_ONLY = 1.0

    def defer(self, q, p):
        return max_prob(q) < max_prob(p) - self.alpha


@dataclass
class OPT(PositionRule):
    """Defer iff ``max q < max p - alpha * D_TV(p, q)``: the plug-in optimal rule."""

    alpha: float = 0.5
    name = "opt"
    EXACT = float("-inf")
    DRAFTER_ONLY = float("inf")

    def defer(self, q, p):
        d = tv_distance(p, q)
        # alpha = -inf or +inf with d = 0 gives nan, and nan compares False: q = p there anyway
        return max_prob(q) < max_prob(p) - self.alpha * d


@dataclass
class BiLD(PositionRule):
    """Defer iff ``D_TV(p, q) > alpha`` (BiLD-style disagreement)."""

    alpha: float = 0.3
    name = "bild"
    EXACT = -0.1
    DRAFTER_ONLY = 1.0

    def defer(self, q, p):
        return tv_distance(p, q) > self.alpha


@dataclass
class TokenV1(TokenRule):
    """Defer token ``v`` iff ``q(v) < max p - alpha``."""

    alpha: float = 0.0
    name = "tokenv1"
    EXACT = -1.1
    DRAFTER_ONLY = 1.0

    def defer_tokens(self, q, p):
        return q < max_prob(p).unsqueeze(-1) - self.alpha


@dataclass
class TokenV2(TokenRule):
    """Defer token ``v`` iff ``p(v) < max p - alpha``."""

    alpha: float = 0.0
    name = "tokenv2"
    EXACT = -1.1
    DRAFTER_ONLY = 1.0

    def defer_tokens(self, q, p):
        return p < max_prob(p).unsqueeze(-1) - self.alpha


@dataclass
class TokenV3(TokenRule):
    """Defer token ``v`` iff ``p(v) < (1 - alpha) max p`` (top-k / min-p consistency)."""

    alpha: float = 0.5
    name = "tokenv3"
    EXACT = -0.1
    DRAFTER_ONLY = 1.0

    def defer_tokens(self, q, p):
        return p < (1 - self.alpha) * max_prob(p).unsqueeze(-1)


@dataclass
class TopK(TokenRule):
    """Defer token ``v`` iff ``v`` is not among the ``k`` most likely tokens of ``p`` (ties kept)."""

    k: int = 5
    name = "topk"
    knob = "k"
    EXACT = 0
    DRAFTER_ONLY = None  # k = V; depends on the vocabulary

    def __post_init__(self) -> None:
        if self.k < 0:
            raise SpeccascadeError(f"TopK needs k >= 0, got {self.k}")

    def defer_tokens(self, q, p):
        if self.k == 0:
            return torch.ones_like(p, dtype=torch.bool)
        kth = p.topk(min(self.k, p.shape[-1]), dim=-1).values[..., -1:]
        return p < kth


@dataclass
class LossySD(Rule):
    """Lossy speculative decoding (Leviathan et al.): accept with ``min(1, p~(x) / ((1 - alpha) q~(x)))``.

    Not a mixture: the residual is ``norm(max(0, p~ - q~))`` and the bonus comes from ``p~``.
    Every position counts as deferred (the target's distribution always decides).
    """

    alpha: float = 0.1
    name = "lossy"
    granularity = "position"
    EXACT = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SpeccascadeError(f"LossySD needs alpha in [0, 1], got {self.alpha}")

    def mix(self, q, p, q_s, p_s) -> Mix:
        accept = p_s / max(1.0 - self.alpha, EPS)
        defer = torch.ones(q.shape[:-1], dtype=torch.bool, device=q.device)
        return Mix(accept, p_s, defer)


FIXED_RULES: dict[str, type[Rule]] = {
    cls.name: cls
    for cls in (Chow, Diff, OPT, BiLD, TokenV1, TokenV2, TokenV3, TopK, LossySD, AlwaysDefer, NeverDefer)
}


def from_name(name: str, value: float | None = None) -> Rule:
    """Build a fixed rule by its name (``opt``, ``tokenv3``, ...) with its knob set to ``value``."""
    cls = FIXED_RULES.get(name.lower())
    if cls is None:
        raise SpeccascadeError(f"unknown rule {name!r}; known: {', '.join(FIXED_RULES)}")
    if value is None or cls.knob is None:
        return cls()
    return cls(**{cls.knob: int(value) if cls.knob == "k" else float(value)})


def parse(spec: str) -> Rule:
    """A rule from its command-line spelling: ``name`` or ``name:value`` (``opt:0.3``, ``topk:5``)."""
    name, _, value = spec.partition(":")
    if not value:
        return from_name(name)
    try:
        return from_name(name, float(value))
    except ValueError as err:
        if isinstance(err, SpeccascadeError):
            raise
        raise SpeccascadeError(f"rule {spec!r}: {value!r} is not a number") from err
