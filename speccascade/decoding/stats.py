"""Decoding statistics, per row and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

COUNTERS = (
    "target_calls",  # target forward passes this row took part in
    "drafter_calls",  # drafter forward passes this row took part in
    "drafted",  # draft tokens proposed
    "accepted",  # draft tokens accepted
    "decided",  # drafted positions the accept scan examined (accepted ones + the first rejection)
    "deferrals",  # examined positions whose draft the rule deferred (r = 1 at the draft)
    "rejections",  # blocks that ended in a rejection
    "new_tokens",  # tokens emitted (after EOS / max_new_tokens truncation)
)


class Counters:
    """Device-side per-row counters, accumulated without host syncs."""

    def __init__(self, batch_size: int, block_size: int, device: torch.device) -> None:
        self.rows = {name: torch.zeros(batch_size, dtype=torch.long, device=device) for name in COUNTERS}
        self.reached_at = torch.zeros(batch_size, max(block_size, 1), dtype=torch.long, device=device)
        self.accepted_at = torch.zeros_like(self.reached_at)
        self.target_forwards = 0
        self.drafter_forwards = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        self.rows[name] += value

    def finish(self, wall_s: float) -> DecodeStats:
        rows = {name: t.tolist() for name, t in self.rows.items()}
        reached = self.reached_at.sum(0).tolist()
        accepted = self.accepted_at.sum(0).tolist()
        return DecodeStats(
            **{name: sum(values) for name, values in rows.items()},
            target_forwards=self.target_forwards,
            drafter_forwards=self.drafter_forwards,
            acceptance_by_position=[a / r if r else float("nan") for a, r in zip(accepted, reached)],
            wall_s=wall_s,
            rows=[dict(zip(rows, values)) for values in zip(*rows.values())],
        )


@dataclass
class DecodeStats:
    """Totals over rows (sums of the per-row counters), batched forward counts and wall time."""

    target_calls: int
    drafter_calls: int
    drafted: int
    accepted: int
    decided: int
    deferrals: int
    rejections: int
    new_tokens: int
    target_forwards: int  # batched target forward passes (what wall time pays for)
    drafter_forwards: int
    acceptance_by_position: list[float]  # P(draft k accepted | the scan reached k)
    wall_s: float
    rows: list[dict[str, int]] = field(default_factory=list)

    @property
    def tokens_per_target_call(self) -> float:
        """Emitted tokens per target call of a row (the same measure for any batch size)."""
        return self.new_tokens / self.target_calls if self.target_calls else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.decided if self.decided else float("nan")

    @property
    def deferral_rate(self) -> float:
        return self.deferrals / self.decided if self.decided else float("nan")

    @property
    def rejection_rate(self) -> float:
        """Rejected drafts per examined position."""
        return self.rejections / self.decided if self.decided else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else float("nan")

    def as_dict(self) -> dict:
        """Everything, derived rates included, as plain JSON-ready values."""
        out = asdict(self)
        for name in ("tokens_per_target_call", "acceptance_rate", "deferral_rate", "rejection_rate", "tokens_per_s"):
            out[name] = getattr(self, name)
        return out
