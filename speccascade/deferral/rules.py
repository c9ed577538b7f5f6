"""Deferral rules: decide, per drafted position (or per candidate token), whether to defer to the target.

Every rule follows algorithms.md section 4. Decisions are taken on the *unscaled* (T = 1)
probabilities ``q``, ``p``; the mixture ``pi`` is built from the sampling distributions ``q_s``
(``q~``) and ``p_s`` (``p~``), as the paper's official colab does. All tensors are ``[B, T, V]``
(batch, block position, vocabulary) and every rule is vectorised over all three axes.

A rule turns one block into a :class:`Mix`: the decoder accepts a draft ``x`` with probability
``min(1, accept(x) / q~(x))``, draws a rejected position's token from ``norm(max(0, emit - q~))``
and the bonus token from ``emit``. For the cascaded rules ``accept = emit = pi``.

Each rule class names its knob (``alpha``; ``k`` for :class:`TopK`, ``theta`` for :class:`FLy`) and owns its knob
metadata: ``EXACT`` and ``DRAFTER_ONLY``, a knob value at which it is exact speculative decoding
and one at which it accepts every draft, and ``SWEEP``, the knobs a decoding sweep tries by default.

A rule with a knob is a *score* compared with it: it defers iff ``score(features) > cut``, the cut being the knob
(:class:`TopK`: ``p_rank > k - 1/2``; :class:`FLy`, whose deferral grows with its knob: ``-theta``, on trace rows
only, which give it its block through their columns). The formula is written once, in ``score``, over named
features of :mod:`speccascade.deferral.features`: the decoder feeds it features of live
distributions, offline comparisons feed it the same columns read from traces, and since the
deferral rate falls as the knob grows, the knob for a deferral budget is a quantile of the score.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Mapping, NamedTuple

import numpy as np
import torch

from ..errors import SpeccascadeError
from .features import DRAFTER_ONLY_FEATURES, EPS, SPEC_NAME, SPEC_VERSION, live_context, position_features, trace_context
from .features import vocabulary_token_features
from .spec import CONTEXT_INPUTS, HIDDEN_INPUTS, trace_column
from .features import TOKEN_FEATURES as TOKEN_NAMES

if TYPE_CHECKING:
    from .heads import DeferralHead


def number_text(number: float) -> str:
    """A knob or setting spelled so that it reads back as the same float (``0.1789148449897766``, not the
    6-digit ``0.178915``): the shortest exact spelling, whole numbers without ``.0``."""
    text = repr(float(number))
    return text[:-2] if text.endswith(".0") else text


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
    needs_hidden: ClassVar[bool] = False  # True: reads the models' last hidden states
    needs_bonus_drafter: ClassVar[bool] = True  # False: the bonus token ignores q at position gamma + 1
    needs_drafts: ClassVar[bool] = False  # True: decides from the whole block's drafts (no per-position score in the decoder)
    needs_reply: ClassVar[bool] = False  # True: reads each draft's position in the reply (mix gets reply_start)
    knob: ClassVar[str | None] = "alpha"
    features: ClassVar[tuple[str, ...]] = ()  # the features ``score``/``decide`` read
    EXACT: ClassVar[float | None] = None
    DRAFTER_ONLY: ClassVar[float | None] = None
    SWEEP: ClassVar[tuple[float, ...]] = ()  # knobs a decoding sweep tries by default

    @property
    def spec(self) -> str:
        """The command-line spelling (``opt:0.3``, ``kl:0.2:tau=0.9``) that :func:`parse` reads back as it was."""
        if self.knob is None:
            return self.name
        return f"{self.name}:{number_text(getattr(self, self.knob))}{self.settings_spec}"

    @property
    def settings_spec(self) -> str:
        """``:tau=0.9``: the settings besides the knob, spelled as :attr:`spec` spells them."""
        return "".join(f":{k}={number_text(getattr(self, k))}" for k in self.params())

    @classmethod
    def params(cls) -> tuple[str, ...]:
        """Settings besides the knob (``tau`` of :class:`KLJudge`), spelled ``name=value`` after it."""
        return tuple(k for k in getattr(cls, "__dataclass_fields__", {}) if k != cls.knob)

    @property
    def cut(self) -> float:
        """The value ``score`` must exceed for a deferral (the knob itself, for most rules)."""
        return getattr(self, self.knob)

    def knob_of(self, cut: float) -> float:
        """The knob whose :attr:`cut` is ``cut`` (offline curves report their cuts as knobs)."""
        return cut

    @property
    def columns(self) -> tuple[str, ...]:
        """The trace columns ``score`` reads offline (the features, for most rules)."""
        return tuple(self.features)

    def score(self, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The quantity compared with the knob; larger means defer sooner."""
        raise SpeccascadeError(f"rule {self.name!r} has no knob, so no score")

    def decide(self, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``r`` (bool) from named features; position rules per position, token rules per token."""
        return self.score(f) > self.cut

    @abstractmethod
    def mix(
        self,
        q: torch.Tensor,
        p: torch.Tensor,
        q_s: torch.Tensor,
        p_s: torch.Tensor,
        rel_position: torch.Tensor | float = 1.0,
        hidden: Mapping[str, torch.Tensor] | None = None,
        drafts: torch.Tensor | None = None,
    ) -> Mix:
        """The block's :class:`Mix` from unscaled ``q``, ``p`` and sampling ``q_s``, ``p_s``.

        ``rel_position`` ``[T]``: (position in block + 1) / block size, for rules that use it;
        ``hidden``: ``q_hidden``/``p_hidden`` ``[B, T, H]``, for rules that ``needs_hidden``;
        ``drafts`` ``[B, T - 1]``: the block's drafted tokens, for rules that ``needs_drafts``.
        Rules that ``needs_reply`` also take ``reply_start`` ``[B]``, the reply index of each row's first draft
        (the decoder passes it to those rules alone, so rules written before it need not accept it).
        """

    @staticmethod
    def deferred_at(defer: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``r`` at the given tokens ``[B, T]``: the decision that applied to each draft."""
        if defer.dim() == tokens.dim():
            return defer
        return defer.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class PositionRule(Rule):
    """One decision per position: ``pi = (1 - r) q~ + r p~``."""

    granularity = "position"

    def defer(self, q: torch.Tensor, p: torch.Tensor | None, rel_position: torch.Tensor | float = 1.0, hidden=None,
              context=None) -> torch.Tensor:
        """Boolean ``r`` ``[B, T]`` from unscaled ``q`` (and ``p`` when ``needs_target``); ``hidden`` and ``context``
        (:func:`~speccascade.deferral.features.live_context`) are ``[B, T, ...]`` inputs read as they are."""
        names = tuple(n for n in self.features if n not in HIDDEN_INPUTS + CONTEXT_INPUTS)
        return self.decide(position_features(q, p, rel_position, names) | dict(hidden or {}) | dict(context or {}))

    def mix(self, q, p, q_s, p_s, rel_position=1.0, hidden=None, drafts=None) -> Mix:
        return PositionRule.mixture(self.defer(q, p, rel_position, hidden), q_s, p_s)

    @staticmethod
    def mixture(r: torch.Tensor, q_s: torch.Tensor, p_s: torch.Tensor) -> Mix:
        """``pi = (1 - r) q~ + r p~`` for position decisions ``r`` ``[B, T]``."""
        pi = torch.where(r.unsqueeze(-1), p_s, q_s)
        return Mix(pi, pi, r)


class TokenRule(Rule):
    """One decision per candidate token: ``pi(v) = q~(v) (1 - r(v)) + p~(v) eta``.

    ``eta = sum_u r(u) q~(u)`` is summed over the whole vocabulary. ``decide`` reads token-level
    features per token and position-level ones broadcast over the vocabulary.
    """

    granularity = "token"

    def defer_tokens(self, q: torch.Tensor, p: torch.Tensor, rel_position: torch.Tensor | float = 1.0, hidden=None,
                     context=None, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean ``r(v)`` ``[B, T, V]``; ``context`` inputs come broadcastable over the vocabulary
        (:func:`~speccascade.deferral.features.live_context` with ``per_token``). With ``candidates`` ``[B, T, k]``
        the rule decides at those tokens only and ``r`` is True elsewhere."""
        token_names = tuple(n for n in self.features if n in TOKEN_NAMES)
        f = vocabulary_token_features(q, p, token_names)
        context = dict(context or {})
        if candidates is not None:
            f = {name: value.gather(-1, candidates) for name, value in f.items()}
            context |= {"draft_token": candidates} if "draft_token" in context else {}
        names = tuple(n for n in self.features if n not in TOKEN_NAMES + HIDDEN_INPUTS + CONTEXT_INPUTS)
        f.update({name: value.unsqueeze(-1) for name, value in position_features(q, p, rel_position, names).items()})
        f.update({name: value.unsqueeze(-2) for name, value in (hidden or {}).items()})  # [B, T, 1, H]
        r = self.decide(f | context)
        return r if candidates is None else torch.ones_like(q, dtype=torch.bool).scatter(-1, candidates, r)

    def mix(self, q, p, q_s, p_s, rel_position=1.0, hidden=None, drafts=None) -> Mix:
        return TokenRule.mixture(self.defer_tokens(q, p, rel_position, hidden), q_s, p_s)

    @staticmethod
    def mixture(r: torch.Tensor, q_s: torch.Tensor, p_s: torch.Tensor) -> Mix:
        """``pi(v) = q~(v) (1 - r(v)) + p~(v) eta`` for token decisions ``r`` ``[B, T, V]``."""
        deferred_q = torch.where(r, q_s, 0.0)
        eta = deferred_q.sum(-1, keepdim=True)
        pi = (q_s - deferred_q) + p_s * eta
        return Mix(pi, pi, r)


@dataclass
class AlwaysDefer(PositionRule):
    """``r = 1`` everywhere: exact speculative decoding (the target alone in the sequential cascade)."""

    name = "always"
    needs_target = False
    needs_bonus_drafter = False
    knob = None
    features = ("q_top1",)

    def decide(self, f):
        return torch.ones_like(f["q_top1"], dtype=torch.bool)


@dataclass
class NeverDefer(PositionRule):
    """``r = 0`` everywhere: the drafter's own decoding, every draft accepted."""

    name = "never"
    needs_target = False
    knob = None
    features = ("q_top1",)

    def decide(self, f):
        return torch.zeros_like(f["q_top1"], dtype=torch.bool)


@dataclass
class Chow(PositionRule):
    """Defer iff ``max q < 1 - alpha`` (the drafter is unsure)."""

    alpha: float = 0.5
    name = "chow"
    needs_target = False
    features = ("q_top1",)
    EXACT = -0.1
    DRAFTER_ONLY = 1.0
    SWEEP = (0.2, 0.4, 0.6, 0.8)

    def score(self, f):
        return 1 - f["q_top1"]


@dataclass
class Diff(PositionRule):
    """Defer iff ``max q < max p - alpha`` (the target is surer by a margin)."""

    alpha: float = 0.0
    name = "diff"
    features = ("q_top1", "p_top1")
    EXACT = -1.1
    DRAFTER_ONLY = 1.0
    SWEEP = (-0.1, 0.0, 0.1, 0.3)

    def score(self, f):
        return f["p_top1"] - f["q_top1"]


@dataclass
class OPT(PositionRule):
    """Defer iff ``max q < max p - alpha * D_TV(p, q)``: the plug-in optimal rule."""

    alpha: float = 0.5
    name = "opt"
    features = ("q_top1", "p_top1", "tv")
    EXACT = float("-inf")
    DRAFTER_ONLY = float("inf")
    SWEEP = (-1.0, 0.0, 0.5, 2.0)

    def score(self, f):
        # tv = 0 means q = p: 0 / 0 is nan, which never exceeds a knob (deferring changes nothing there)
        return (f["p_top1"] - f["q_top1"]) / f["tv"]


@dataclass
class BiLD(PositionRule):
    """Defer iff ``D_TV(p, q) > alpha`` (BiLD-style disagreement)."""

    alpha: float = 0.3
    name = "bild"
    features = ("tv",)
    EXACT = -0.1
    DRAFTER_ONLY = 1.0
    SWEEP = (0.2, 0.4, 0.6, 0.8)

    def score(self, f):
        return f["tv"]


@dataclass
class KLJudge(PositionRule):
    """Defer iff ``KL(p || q) > alpha``, or strictly (exact speculative decoding) where the target is
    sure: ``max p > tau``. The training-free judge of "Revisiting Judge Decoding" (2026): a
    divergence threshold, with the target's own confidence as a guard."""

    alpha: float = 0.5
    tau: float = 0.9
    name = "kl"
    features = ("kl_pq", "p_top1")
    EXACT = -0.1
    DRAFTER_ONLY = float("inf")  # inf exceeds no score, strict positions' included
    SWEEP = (0.1, 0.3, 1.0, 3.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau <= 1.0:
            raise SpeccascadeError(f"kl needs tau in [0, 1], got {self.tau}")

    def score(self, f):
        # strict positions score +inf: deferred at every knob but alpha = +inf, which keeps every draft
        return torch.where(f["p_top1"] > self.tau, torch.inf, f["kl_pq"])


@dataclass
class JS(PositionRule):
    """Defer iff the Jensen-Shannon divergence ``JS(p, q) > alpha`` (in nats; Fuzzy speculative decoding)."""

    alpha: float = 0.1
    name = "js"
    features = ("js",)
    EXACT = -0.1
    DRAFTER_ONLY = 1.0  # JS <= log 2
    SWEEP = (0.02, 0.05, 0.1, 0.2)

    def score(self, f):
        return f["js"]


@dataclass
class Entropy(PositionRule):
    """Defer iff the drafter's entropy ``H(q) > alpha`` (nats): an entropy gate, which needs no ``p``
    and so also runs in the sequential cascade."""

    alpha: float = 1.0
    name = "entropy"
    needs_target = False
    features = ("q_entropy",)
    EXACT = -0.1
    DRAFTER_ONLY = float("inf")
    SWEEP = (0.5, 1.0, 2.0, 3.0)

    def score(self, f):
        return f["q_entropy"]


@dataclass
class Gain(PositionRule):
    """Defer iff the expected gain of deferring, judged by the target, exceeds ``alpha``:
    ``sum_v p(v) (p(v) - q(v)) = E_{y ~ p}[(1 - q(y)) - (1 - p(y))] > alpha``. The plug-in rule for
    the soft loss ``1 - q(y)``, as OPT is the plug-in rule for the 0-1 loss of the argmax."""

    alpha: float = 0.1
    name = "gain"
    features = ("p_sq", "pq_dot")
    EXACT = -1.1  # the gain lies in [-1, 1]
    DRAFTER_ONLY = 1.0
    SWEEP = (0.0, 0.05, 0.1, 0.2)

    def score(self, f):
        return f["p_sq"] - f["pq_dot"]


@dataclass
class FLy(Rule):
    """FLy, training-free loosely speculative decoding (Li et al., ICLR 2026): keep a draft the target
    would not have chosen where the target is unsure and, having read it, goes on with the drafter.

    A draft ``x_t`` is a *mismatch* where it is not a top-1 token of ``p_t``. A mismatch is kept
    (``r = 0``, ``pi = q~``) iff the target's top-3 entropy ``-sum_{i<=3} p_(i) log p_(i)`` exceeds
    ``theta`` (the entropy gate) and each of the next ``window`` drafts is a top-1 token of its ``p``
    (the deferred window; a window that runs past the block's last draft keeps nothing). Every other
    position defers (``pi = p~``), so matches pass speculative decoding's own test. The deferral rate
    *grows* with ``theta``; above log 3 no mismatch passes the gate: exact speculative decoding.
    Reading the block's drafts, it has no per-position score in the decoder (algorithms.md, "Block rules"); on trace
    rows, which hold each block's drafts as rows of one example and block, :meth:`score` gives one.
    """

    theta: float = 0.3
    window: int = 2
    name = "fly"
    granularity = "position"
    needs_bonus_drafter = False
    needs_drafts = True
    knob = "theta"
    features = ("p_top1", "p_top2", "p_top3")
    EXACT = 1.1  # the top-3 entropy is at most log 3 < 1.1
    SWEEP = (0.1, 0.3, 0.6)
    BLOCK_COLUMNS = ("p_tok", "example_index", "turn", "position", "position_in_block")  # what places a row in its block

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window) and self.window == int(self.window) and self.window >= 1):
            raise SpeccascadeError(f"fly needs a whole number window >= 1, got {self.window:g}")
        self.window = int(self.window)

    @property
    def cut(self) -> float:
        return -self.theta  # score = -H3 where a mismatch could be kept: deferral grows with theta

    def knob_of(self, cut: float) -> float:
        return -cut

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.features, *self.BLOCK_COLUMNS)

    def entropy(self, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The top-3 entropy ``H3(p)`` of the gate, from the ``p_top1..3`` features."""
        top = torch.stack([f[name] for name in self.features], -1)
        return -(top * top.clamp_min(EPS).log()).sum(-1)

    def score(self, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """On trace rows: ``-H3(p)`` where the draft is a mismatch (``p_tok < p_top1``) whose next ``window`` drafts
        are rows of the same example, turn and block (``position - position_in_block``) and matches, +inf elsewhere
        (deferred at every theta); ``score > -theta`` iff FLy defers there (up to ties ``H3 = theta``, which
        :meth:`decide` settles as the decoder does). A window with a row missing (a draft past the reply's end)
        keeps nothing, as one past the block does."""
        missing = [c for c in self.columns if c not in f]
        if missing:
            raise SpeccascadeError(f"rule 'fly' scores trace rows from their blocks: the columns {', '.join(missing)} "
                                   "are missing (log-traces writes them)")
        return torch.where(self._keepable(f), -self.entropy(f), torch.inf)

    def decide(self, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``score > cut`` but at ties, which it settles as the decoder does (why it is overridden): at ``H3 = theta``
        the decoder's gate (``H3 > theta``) is shut and the draft deferred, where ``-H3 > -theta`` would keep it."""
        return ~(self._keepable(f) & (self.entropy(f) > self.theta))

    def _keepable(self, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Trace rows whose draft FLy keeps for a low enough theta: a mismatch whose window is confirmed."""
        agree = (f["p_tok"] >= f["p_top1"]).cpu().numpy()
        example, turn, position, in_block = (f[c].cpu().numpy().astype(np.int64) for c in self.BLOCK_COLUMNS[1:])
        block = position - in_block  # a block of one turn's decode (positions restart at 0 in each turn)
        order = np.lexsort((in_block, block, turn, example))  # each block's rows together, by position in the block
        key, agree = np.stack([example[order], turn[order], block[order], in_block[order]], 1), agree[order]
        confirmed = np.ones(len(order), dtype=bool)
        for step in range(1, self.window + 1):
            follows = np.zeros(len(order), dtype=bool)  # the row `step` later is the same block's draft `step` later, a match
            follows[:-step] = (key[step:] == key[:-step] + [0, 0, 0, step]).all(1) & agree[step:]
            confirmed &= follows
        keepable = np.empty(len(order), dtype=bool)
        keepable[order] = confirmed & ~agree
        return torch.from_numpy(keepable).to(f["p_tok"].device)

    def defer(self, p: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """Boolean ``r`` ``[B, T]`` from unscaled ``p`` ``[B, T, V]`` and ``drafts`` ``[B, G]``, G <= T;
        positions past the drafts (the bonus) defer."""
        gamma = drafts.shape[1]
        p_d = p[:, :gamma]
        f = position_features(p_d, p_d, names=self.features)
        uncertain = self.entropy(f) > self.theta
        agree = p_d.gather(-1, drafts.unsqueeze(-1)).squeeze(-1) >= f["p_top1"]
        agreed = torch.nn.functional.pad(agree.long().cumsum(1), (1, 0))  # [B, G + 1]: among the first j drafts
        t = torch.arange(gamma, device=p.device)
        end = t + 1 + self.window  # one past the window's last draft
        confirmed = (end <= gamma) & (agreed[:, end.clamp_max(gamma)] - agreed[:, t + 1] == self.window)
        keep = ~agree & uncertain & confirmed
        bonus = torch.ones_like(p[:, gamma:, 0], dtype=torch.bool)
        return torch.cat([~keep, bonus], dim=1)

    def mix(self, q, p, q_s, p_s, rel_position=1.0, hidden=None, drafts=None) -> Mix:
        if drafts is None:
            raise SpeccascadeError("rule 'fly' reads the block's drafts: pass drafts to mix")
        r = self.defer(p, drafts)
        pi = torch.where(r.unsqueeze(-1), p_s, q_s)
        return Mix(pi, pi, r)


@dataclass
class TokenV1(TokenRule):
    """Defer token ``v`` iff ``q(v) < max p - alpha``."""

    alpha: float = 0.0
    name = "tokenv1"
    features = ("q_tok", "p_top1")
    EXACT = -1.1
    DRAFTER_ONLY = 1.0
    SWEEP = (-0.1, 0.0, 0.1, 0.3)

    def score(self, f):
        return f["p_top1"] - f["q_tok"]


@dataclass
class TokenV2(TokenRule):
    """Defer token ``v`` iff ``p(v) < max p - alpha``."""

    alpha: float = 0.0
    name = "tokenv2"
    features = ("p_tok", "p_top1")
    EXACT = -1.1
    DRAFTER_ONLY = 1.0
    SWEEP = (0.0, 0.1, 0.3, 0.6)

    def score(self, f):
        return f["p_top1"] - f["p_tok"]


@dataclass
class TokenV3(TokenRule):
    """Defer token ``v`` iff ``p(v) < (1 - alpha) max p`` (top-k / min-p consistency)."""

    alpha: float = 0.5
    name = "tokenv3"
    features = ("p_tok", "p_top1")
    EXACT = -0.1
    DRAFTER_ONLY = 1.0
    SWEEP = (0.2, 0.5, 0.8, 0.95)

    def score(self, f):
        return 1 - f["p_tok"] / f["p_top1"]


@dataclass
class TopK(TokenRule):
    """Defer token ``v`` iff ``v`` is not among the ``k`` most likely tokens of ``p`` (ties kept)."""

    k: int = 5
    name = "topk"
    knob = "k"
    features = ("p_rank",)
    EXACT = 0
    DRAFTER_ONLY = None  # k = V; depends on the vocabulary
    SWEEP = (1, 3, 10, 50)

    def __post_init__(self) -> None:
        if self.k < 0:
            raise SpeccascadeError(f"TopK needs k >= 0, got {self.k}")

    @property
    def cut(self) -> float:
        return self.k - 0.5  # p_rank is a whole number: p_rank > k - 1/2 iff p_rank >= k

    def score(self, f):
        return f["p_rank"]  # tokens strictly more likely than v


@dataclass
class LossySD(Rule):
    """Lossy speculative decoding (Leviathan et al.): accept with ``min(1, p~(x) / ((1 - alpha) q~(x)))``.

    Not a mixture: the residual is ``norm(max(0, p~ - q~))`` and the bonus comes from ``p~``.
    Every position counts as deferred (the target's distribution always decides).
    """

    alpha: float = 0.1
    name = "lossy"
    granularity = "position"
    needs_bonus_drafter = False
    features = ("q_top1",)
    EXACT = 0.0
    SWEEP = (0.1, 0.3, 0.5, 0.8)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SpeccascadeError(f"LossySD needs alpha in [0, 1], got {self.alpha}")

    def decide(self, f):
        return torch.ones_like(f["q_top1"], dtype=torch.bool)

    def mix(self, q, p, q_s, p_s, rel_position=1.0, hidden=None, drafts=None) -> Mix:
        accept = p_s / max(1.0 - self.alpha, EPS)
        defer = torch.ones(q.shape[:-1], dtype=torch.bool, device=q.device)
        return Mix(accept, p_s, defer)


@dataclass
class Learned(Rule):
    """A learned deferral head as a rule (algorithms.md section 5), position- or token-level.

    Heads trained for gap regression defer iff the predicted gap ``loss_q - loss_p`` exceeds
    ``threshold`` (a learned Diff: the expected gain of a deferral); classification and relaxed heads
    defer iff their calibrated probability exceeds ``threshold``. Forced to r = 1 (``EXACT``) it is exact speculative decoding.
    Token-level heads (token features, or the drafted token's id) are evaluated over the whole vocabulary.
    On trace columns the context inputs are derived from ``columns`` (:func:`~speccascade.deferral.features.trace_context`).
    """

    head: "DeferralHead"
    threshold: float = 0.5
    alpha: float = 0.0  # the trade-off asked of an alpha-conditioned head (ignored by others)
    name = "learned"
    knob = "threshold"
    EXACT = float("-inf")
    DRAFTER_ONLY = float("inf")
    defer = PositionRule.defer
    defer_tokens = TokenRule.defer_tokens

    def __post_init__(self) -> None:
        self.head.eval()
        inputs = tuple(name for name in self.head.features if name != "alpha")
        self.features = inputs

    @property
    def granularity(self) -> str:
        return self.head.granularity

    @property
    def needs_target(self) -> bool:
        return any(f not in DRAFTER_ONLY_FEATURES for f in self.features)  # context inputs too: only this decoder gives them

    @property
    def needs_reply(self) -> bool:
        return "reply_position" in self.features

    @property
    def columns(self) -> tuple[str, ...]:
        """The trace columns the head reads (``target_argmax`` for ``target_token``, ``position`` for ``reply_position``)."""
        return tuple(trace_column(name) for name in self.features)

    @property
    def spec(self) -> str:
        return f"learned:{self.head.provenance.get('path', '?')}@{number_text(self.threshold)}"

    @torch.no_grad()
    def score(self, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the threshold is compared with: the calibrated probability, or the predicted gap."""
        some = next(iter(f.values()))
        if self.head.mean.device != some.device:  # heads load on the CPU; follow the decoder's device
            self.head.to(some.device)
        if "alpha" in self.head.features:
            f = {**f, "alpha": torch.tensor(self.alpha, dtype=some.dtype, device=some.device)}
        f = {**trace_context(f, [n for n in self.features if n in CONTEXT_INPUTS and n not in f]), **f}
        score = self.head(self.head.inputs(f))
        return score if self.head.objective == "gap" else self.head.probability(score)

    @property
    def needs_hidden(self) -> bool:
        return self.head.needs_hidden

    def mix(self, q, p, q_s, p_s, rel_position=1.0, hidden=None, drafts=None, reply_start=None) -> Mix:
        token = self.granularity == "token"
        # commands refuse such a head before decoding (check_head); a decoder built by hand in Python gets here
        if self.head.ids and q.shape[-1] != self.head.vocab_size:
            raise SpeccascadeError(f"head {self.head.provenance.get('path', '?')} embeds token ids of a vocabulary of "
                                   f"{self.head.vocab_size} tokens; the pair scores {q.shape[-1]}")
        context = live_context(p, reply_start, self.features, per_token=token)
        if not token:
            return PositionRule.mixture(self.defer(q, p, rel_position, hidden, context), q_s, p_s)
        # r(v) enters pi only where q~(v) > 0: the head runs on q~'s support (greedy: the drafts alone), not on V tokens
        support = int((q_s > 0).sum(-1).max())
        candidates = q_s.topk(support, dim=-1).indices if support < q_s.shape[-1] else None
        return TokenRule.mixture(self.defer_tokens(q, p, rel_position, hidden, context, candidates), q_s, p_s)

    @classmethod
    def from_pretrained(cls, directory: str | Path, threshold: float | None = None, alpha: float = 0.0) -> "Learned":
        """Load a head checkpoint; refuse one whose feature spec this decoder does not provide."""
        from .heads import DeferralHead, read_config

        directory = Path(directory)
        spec = read_config(directory).get("feature_spec")
        spec = spec if isinstance(spec, dict) else {}
        if spec.get("name") != SPEC_NAME or spec.get("version") != SPEC_VERSION:
            raise SpeccascadeError(
                f"head in {directory} was trained on feature spec {spec.get('name')} v{spec.get('version')}; "
                f"this decoder provides {SPEC_NAME} v{SPEC_VERSION}"
            )
        head = DeferralHead.load(directory)
        head.provenance = {**head.provenance, "path": str(directory)}
        if threshold is None:
            threshold = head.operating_points.get("default", 0.0 if head.objective == "gap" else 0.5)
        return cls(head, threshold, alpha)


FIXED_RULES: dict[str, type[Rule]] = {
    cls.name: cls
    for cls in (Chow, Diff, OPT, BiLD, Gain, KLJudge, JS, Entropy, FLy, TokenV1, TokenV2, TokenV3, TopK, LossySD, AlwaysDefer,
                NeverDefer)
}
SPELLING = "name, name:KNOB, name:KNOB:PARAM=VALUE or learned:DIR[@THRESHOLD]"


def from_name(name: str, value: float | None = None, **params: float) -> Rule:
    """Build a fixed rule by its name (``opt``, ``tokenv3``, ...) with its knob set to ``value``."""
    cls = FIXED_RULES.get(name.lower())
    if cls is None:
        raise SpeccascadeError(f"unknown rule {name!r}; known: {', '.join(FIXED_RULES)}, learned:DIR")
    unknown = sorted(set(params) - set(cls.params()))
    if unknown:
        known = ", ".join(cls.params()) or "none"
        raise SpeccascadeError(f"rule {cls.name!r} has no setting {unknown[0]!r} (settings: {known})")
    if value is None:
        return cls(**params)
    if cls.knob is None:
        raise SpeccascadeError(f"rule {cls.name!r} has no knob; write it as {cls.name!r}")
    if cls.knob == "k" and not (math.isfinite(value) and float(value) == int(value)):
        raise SpeccascadeError(f"rule {cls.name!r} needs a whole number k, got {value:g}")
    return cls(**{cls.knob: int(value) if cls.knob == "k" else float(value)}, **params)


def _number(spec: str, text: str) -> float:
    """A knob, threshold or setting: a number, not NaN (infinities are the exact / drafter-only limits)."""
    try:
        value = float(text)
    except ValueError:
        raise SpeccascadeError(f"rule {spec!r}: {text!r} is not a number") from None
    if value != value:
        raise SpeccascadeError(f"rule {spec!r}: the knob must be a number, not NaN")
    return value


@dataclass(frozen=True)
class Spec:
    """A rule's spelling, parsed and checked (:func:`parse`): its ``name``, its ``knob`` when one is given (a
    learned head's threshold), its ``params`` (``PARAM=VALUE`` settings) and, for ``learned``, the ``head``'s
    directory. Nothing is loaded: :meth:`build` makes the rule."""

    name: str
    knob: float | None = None
    params: tuple[tuple[str, float], ...] = ()
    head: str | None = None

    def build(self) -> Rule:
        """The rule it spells (a learned head is loaded here). A command's own names (:func:`parse`'s
        ``others``) are no rules: the command builds what they stand for."""
        if self.name == "learned":
            return Learned.from_pretrained(self.head, self.knob)
        return from_name(self.name, self.knob, **dict(self.params))


def parse(spec: str, others: Mapping[str, type[Rule] | None] | None = None, setting: str = "--rules") -> Spec:
    """The one parser of a rule's command-line spelling: ``name``, ``name:KNOB`` (``opt:0.3``, ``topk:5``),
    ``name:KNOB:PARAM=VALUE`` (``kl:0.2:tau=0.9``), ``name:PARAM=VALUE`` (the default knob) or
    ``learned:DIR[@THRESHOLD]``. ``others`` are a command's own names beside the rules (``evaluate``'s
    ``target``), each with the rule class whose knob and settings it takes, or None for none. Anything else
    is a :class:`SpeccascadeError` that names ``setting`` (the flag that gave the rule) and the problem."""
    try:
        return _parse(spec, others or {})
    except SpeccascadeError as err:
        raise SpeccascadeError(f"{setting}: {err}") from None


def _parse(spec: str, others: Mapping[str, type[Rule] | None]) -> Spec:
    text = spec.strip()
    name, _, rest = text.partition(":")
    name = name.lower()
    if not name:
        raise SpeccascadeError(f"empty rule {spec!r}; write {SPELLING}")
    if name == "learned":
        path, _, threshold = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if not path:
            raise SpeccascadeError(f"rule {spec!r} names no head directory; write learned:DIR[@THRESHOLD]")
        return Spec(name, _number(text, threshold) if threshold else None, head=path)
    if name not in FIXED_RULES and name not in others:
        raise SpeccascadeError(f"unknown rule {name!r}; known: {', '.join([*others, *FIXED_RULES])}, learned:DIR")
    cls = others[name] if name in others else FIXED_RULES[name]
    if rest and (cls is None or cls.knob is None and "=" not in rest.partition(":")[0]):
        raise SpeccascadeError(f"rule {name!r} takes no knob; write it as {name!r}, not {text!r}")
    knob, params = _knob_and_params(text, rest)
    if cls is not None:
        from_name(cls.name, knob, **params)  # the knob's and the settings' checks, on a rule that is thrown away
    return Spec(name, knob, tuple(params.items()))


def _knob_and_params(text: str, rest: str) -> tuple[float | None, dict[str, float]]:
    """``KNOB[:PARAM=VALUE...]`` or ``PARAM=VALUE[:...]`` (the default knob) as numbers."""
    if not rest:
        return None, {}
    knob, *settings = rest.split(":")
    if "=" in knob:  # no knob, only settings: kl:tau=0.8 (a family whose knob a sweep sets)
        knob, settings = None, [knob, *settings]
    params = {}
    for setting in settings:
        key, eq, value = setting.partition("=")
        if not eq or not key:
            raise SpeccascadeError(f"rule {text!r}: {setting!r} is not PARAM=VALUE; write {SPELLING}")
        params[key] = _number(text, value)
    return (None if knob is None else _number(text, knob)), params
