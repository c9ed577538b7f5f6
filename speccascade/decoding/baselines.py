"""Baselines with the speculative cascade's interface: autoregressive decoding of one model, and
the token-level sequential cascade of docs/algorithms.md section 2."""

from __future__ import annotations

import torch

from ..deferral.rules import Rule
from ..errors import SpeccascadeError
from .base import Decoder
from .pairs import ModelPair
from .sampling import sample
from .state import DecodeState


class Autoregressive(Decoder):
    """One model decoding alone (``which`` = "target" or "drafter"), one forward per token.

    It samples token ``j`` of a row with the same uniform the cascade drafts it with, so the
    drafter alone equals the cascade under ``NeverDefer`` token for token.
    """

    def __init__(self, pair: ModelPair, which: str = "target", temperature: float = 0.0, top_k=None, top_p=None,
                 cache: str | None = None, compile: bool = False) -> None:
        if which not in ("target", "drafter"):
            raise SpeccascadeError(f"which must be 'target' or 'drafter', got {which!r}")
        super().__init__(pair, temperature, top_k, top_p, cache, compile)
        self.which = which

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {self.which: getattr(self.pair, self.which)}

    @torch.inference_mode()
    def step(self, state: DecodeState) -> None:
        slots, out = state.slots, state.out
        block = slots.open(1)
        ids, positions = slots.catch_up(self.which, slots.pending, block.positions)
        logits, _ = slots.caches[self.which].forward(ids, positions, block.window, logits_to_keep=1)
        token = sample(self.sampler(logits[:, 0]), state.streams.draft[state.rows, out.emitted]).unsqueeze(1)
        out.counts.forwards[self.which] += 1
        valid = out.emit(token, state.filled(0))  # 1 for the rows still decoding
        out.counts.add(f"{self.which}_calls", valid)
        slots.advance(slots.pending, valid, 1, token)


class SequentialCascade(Decoder):
    """Token-level sequential cascade: the drafter proposes, a drafter-only rule decides per token,
    and a deferred token comes from the target, which catches up on the skipped tokens in one call.

    Only rules that need no target distribution can run here (Chow, AlwaysDefer, NeverDefer,
    drafter-only learned heads).
    """

    def __init__(self, pair: ModelPair, rule: Rule, temperature: float = 0.0, top_k=None, top_p=None,
                 cache: str | None = None, compile: bool = False) -> None:
        super().__init__(pair, temperature, top_k, top_p, cache, compile)
        if rule.needs_target or rule.granularity != "position" or rule.needs_hidden:
            raise SpeccascadeError(
                f"rule {rule.name!r} needs the target's distribution; the sequential cascade runs only "
                "drafter-only position rules (chow, always, never, drafter-only learned heads)"
            )
        self.rule = rule

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {"drafter": self.pair.drafter, "target": self.pair.target}

    @torch.inference_mode()
    def step(self, state: DecodeState) -> None:
        slots, out = state.slots, state.out
        active = ~out.done
        block = slots.open(1)
        ids, positions = slots.catch_up("drafter", slots.pending, block.positions)
        logits, _ = slots.caches["drafter"].forward(ids, positions, block.window, logits_to_keep=1)
        q = logits[:, 0].softmax(-1)
        dist = self.sampler(logits[:, 0], q)
        r = self.rule.defer(q.unsqueeze(1), None)[:, 0] & active
        out.counts.forwards["drafter"] += 1
        out.counts.add("drafter_calls", active.long())
        out.counts.add("decided", active.long())
        out.counts.add("deferrals", r.long())
        if bool(r.any()):
            dist = torch.where(r.unsqueeze(1), self._catch_up(state), dist)
            out.counts.add("target_calls", r.long())
            out.counts.forwards["target"] += 1
        else:
            slots.behind["target"] += 1  # the target skips this token; it catches up when next deferred to
        token = sample(dist, state.streams.draft[state.rows, out.emitted]).unsqueeze(1)
        valid = out.emit(token, state.filled(0))  # 1 for the rows still decoding
        slots.advance(slots.pending, valid, 1, token)

    def _catch_up(self, state: DecodeState) -> torch.Tensor:
        """Feed the target every token it has not seen, the pending one last; return ``p~`` there."""
        slots = state.slots
        ids, positions = slots.catch_up("target", slots.pending, slots.block.positions)
        logits, _ = slots.caches["target"].forward(ids, positions, slots.block.window, logits_to_keep=1)
        return self.sampler(logits[:, -1])
