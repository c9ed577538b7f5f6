"""Decoding statistics: counters per row, totals that add up across batches, and the rates derived from them.

:class:`DecodeStats` is the one place the rates (tokens per target call, acceptance, deferral and
rejection rates, tokens per second) are computed; sum the stats of several batches first
(``a + b``, ``sum(stats)`` or ``DecodeStats.merge(stats)``), then read the rates off the total.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from itertools import zip_longest
from typing import Iterable

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
RATES = ("tokens_per_target_call", "acceptance_rate", "deferral_rate", "rejection_rate", "tokens_per_s")


class Counters:
    """Device-side per-row counters, plus the batched forwards per model.

    The cascade records each block's outcome with :meth:`block` (references to tensors it made anyway, no
    operator runs) and the counters are computed from all blocks at once in :meth:`finish`; the baselines
    :meth:`add` to the counters directly. Rows that finish may leave the batch (:meth:`keep`): their counts
    are banked under their place in the batch as it started, the order :meth:`finish` reports rows in.
    """

    def __init__(self, batch_size: int, block_size: int, device: torch.device) -> None:
        self.block_size = max(block_size, 1)
        self.forwards = {"drafter": 0, "target": 0}
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.index = torch.arange(batch_size, device=device)  # each row's place in the batch as it started
        self.banked = {name: torch.zeros(batch_size, dtype=torch.long, device=device) for name in COUNTERS}
        self.banked_at = torch.zeros(2, self.block_size, dtype=torch.long, device=device)  # reached_at, accepted_at summed
        self._reset(batch_size)

    def _reset(self, batch_size: int) -> None:
        """Zero the counters of the ``batch_size`` rows decoding now."""
        device = self.index.device
        self.rows = {name: torch.zeros(batch_size, dtype=torch.long, device=device) for name in COUNTERS}
        self.reached_at = torch.zeros(batch_size, self.block_size, dtype=torch.long, device=device)
        self.accepted_at = torch.zeros_like(self.reached_at)
        self.everywhere: dict[int, torch.Tensor] = {}  # all-True ``deferred`` by width

    @torch.inference_mode()
    def keep(self, rows: torch.Tensor | None = None) -> None:
        """Bank every row's counts so far under its place in the starting batch, then count on for the batch rows
        ``rows`` alone (the others have finished and left it); ``None`` banks and keeps every row."""
        self.count_blocks()
        for name, value in self.rows.items():
            self.banked[name].index_add_(0, self.index, value)
        self.banked_at += torch.stack([self.reached_at.sum(0), self.accepted_at.sum(0)])
        if rows is not None:
            self.index = self.index[rows]
        self._reset(self.index.shape[0])

    def deferred_everywhere(self, width: int) -> torch.Tensor:
        """``[B, width]`` True: ``r = 1`` at every position (exact speculative decoding), built once per width; read only."""
        if width not in self.everywhere:
            self.everywhere[width] = torch.ones(self.reached_at.shape[0], width, dtype=torch.bool, device=self.reached_at.device)
        return self.everywhere[width]

    def add(self, name: str, value: torch.Tensor) -> None:
        self.rows[name] += value

    def block(self, count: torch.Tensor, n: torch.Tensor, limit: torch.Tensor, deferred: torch.Tensor,
              forwards: int) -> None:
        """Record a block: ``count`` [B], 0 where the row was done at its start (positive elsewhere), accepted
        drafts ``n``, drafts ``limit``, the rule's ``deferred`` [B, gamma] at each draft, and the drafter steps
        the batch ran."""
        self.blocks.append((count, n, limit, deferred, forwards))

    @torch.inference_mode()
    def count_blocks(self) -> None:
        """Add the recorded blocks to the counters (accepted drafts and the first rejected one are examined);
        in inference mode, as the counters were made (a caller may finish a decode outside it)."""
        if not self.blocks:
            return
        width = self.block_size
        count, n, limit, deferred, forwards = zip(*self.blocks)
        deferred = torch.stack([d if d.shape[1] == width else torch.nn.functional.pad(d, (0, width - d.shape[1]))
                                for d in deferred])  # [N, B, width]
        a, n, limit = (torch.stack(count) > 0).long(), torch.stack(n), torch.stack(limit)  # [N, B]: rows active
        forwards = torch.tensor(forwards, device=n.device).unsqueeze(1)
        offsets = torch.arange(width, device=n.device)
        examined = (offsets <= n.unsqueeze(-1)) & (offsets < limit.unsqueeze(-1))
        for name, value in (("target_calls", a), ("drafter_calls", a * forwards), ("drafted", a * limit),
                            ("accepted", a * n), ("decided", a * examined.sum(-1)),
                            ("deferrals", a * (deferred & examined).sum(-1)), ("rejections", a * (n < limit).long())):
            self.rows[name] += value.sum(0)
        self.reached_at += (a.unsqueeze(-1) * examined).sum(0)
        self.accepted_at += (a.unsqueeze(-1) * (offsets < n.unsqueeze(-1))).sum(0)
        self.blocks = []

    def finish(self, wall_s: float, new_tokens: torch.Tensor) -> DecodeStats:
        """The stats of the whole batch, given each row's ``new_tokens`` (in the order it started in)."""
        self.keep()
        self.banked["new_tokens"] += new_tokens
        rows = {name: t.tolist() for name, t in self.banked.items()}
        reached_at, accepted_at = self.banked_at.tolist()
        return DecodeStats(
            **{name: sum(values) for name, values in rows.items()},
            target_forwards=self.forwards["target"],
            drafter_forwards=self.forwards["drafter"],
            reached_at=reached_at,
            accepted_at=accepted_at,
            wall_s=wall_s,
            rows=[dict(zip(rows, values)) for values in zip(*rows.values())],
        )


@dataclass
class DecodeStats:
    """Totals over rows (sums of the per-row counters), batched forward counts and wall time.

    Stats of several batches add up: ``a + b`` sums every count and the wall times and concatenates
    ``rows``; ``sum(batches)`` and :meth:`merge` do the same over a list.
    """

    target_calls: int = 0
    drafter_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    decided: int = 0
    deferrals: int = 0
    rejections: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # batched target forward passes (what wall time pays for)
    drafter_forwards: int = 0
    reached_at: list[int] = field(default_factory=list)  # per draft index k: times the accept scan reached it
    accepted_at: list[int] = field(default_factory=list)  # ... and accepted the draft there
    wall_s: float = 0.0
    rows: list[dict[str, int]] = field(default_factory=list)  # per-row counters, in batch order

    def __add__(self, other: DecodeStats) -> DecodeStats:
        if not isinstance(other, DecodeStats):
            return NotImplemented
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                  if f.name not in ("reached_at", "accepted_at")}
        summed["rows"] = self.rows + other.rows
        for name in ("reached_at", "accepted_at"):  # blocks of different sizes: positions past one's gamma add 0
            summed[name] = [a + b for a, b in zip_longest(getattr(self, name), getattr(other, name), fillvalue=0)]
        return DecodeStats(**summed)

    def __radd__(self, other: object) -> DecodeStats:
        return self if other == 0 else NotImplemented  # sum() starts from 0

    @classmethod
    def merge(cls, stats: Iterable[DecodeStats]) -> DecodeStats:
        """The total of several batches' stats (empty stats for none)."""
        return sum(stats, cls())

    @property
    def tokens_per_target_call(self) -> float:
        """Emitted tokens per target call of a row (the same measure for any batch size); inf for the drafter alone."""
        if self.target_calls:
            return self.new_tokens / self.target_calls
        return float("inf") if self.new_tokens else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts per examined draft (NaN when no draft was examined)."""
        return self.accepted / self.decided if self.decided else float("nan")

    @property
    def deferral_rate(self) -> float:
        """Deferred drafts per examined draft. Where none was examined, 1 when only the target ran (it
        decides every token) and 0 when only the drafter did; NaN when nothing ran."""
        if self.decided:
            return self.deferrals / self.decided
        if self.target_calls and not self.drafter_calls:
            return 1.0
        return 0.0 if self.drafter_calls and not self.target_calls else float("nan")

    @property
    def rejection_rate(self) -> float:
        """Rejected drafts per examined draft (0 when none was examined: nothing was rejected)."""
        return self.rejections / self.decided if self.decided else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else float("nan")

    @property
    def acceptance_by_position(self) -> list[float]:
        """P(draft k accepted | the accept scan reached k), per draft index (NaN where never reached)."""
        return [a / r if r else float("nan") for a, r in zip(self.accepted_at, self.reached_at)]

    def as_dict(self) -> dict:
        """Everything, derived rates included, as plain JSON-ready values."""
        return asdict(self) | {name: getattr(self, name) for name in (*RATES, "acceptance_by_position")}
