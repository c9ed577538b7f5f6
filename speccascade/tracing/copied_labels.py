"""``log-traces --outcome-from DIR``: outcome labels copied from earlier traces of the same replies.

Outcome labels cost a decoded continuation per mismatch (tens of target tokens each), the replies they label
only one decoding pass. So traces that need other columns of labelled replies (hidden states, top-k) are
logged again without decoding any continuation: each row takes the labels of the row in ``DIR`` at the same
example, turn, block start and position in the block (what makes a row unique: a draft after a rejection shares
its reply position with the next block's first). Greedy decoding, or sampling with the same seeds, repeats the replies
exactly; every row's drafted and target tokens are checked against the labelled row's, so labels are never
attached to a reply they were not computed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import traces
from ..errors import SpeccascadeError

FREE = ("hidden_states", "topk", "limit", "categories", "limit_per_category")  # settings the rows do not depend on
TOKENS = ("draft_token", "target_argmax")
LABELS = ("outcome_harm", "outcome_delta")
COLUMNS = ("example_id", "turn", "position", "position_in_block", *TOKENS, *LABELS)  # what is read (not hidden states)


@dataclass
class CopiedLabels:
    """The outcome labels of ``directory``'s rows, with their drafted and target tokens, by row."""

    directory: Path
    manifest: dict
    rows: dict[tuple[str, int, int, int], tuple[int, int, float, float]]  # by example, turn, position, in block

    @classmethod
    def open(cls, directory: str | Path, config: dict) -> "CopiedLabels":
        """Complete, outcome-labelled traces whose settings equal ``config`` but for :data:`FREE`; else an error."""
        directory = Path(directory)
        if not (directory / traces.MANIFEST).is_file():
            raise SpeccascadeError(f"--outcome-from {directory}: no traces there (no {traces.MANIFEST})")
        manifest = traces.read_manifest(directory)
        theirs = manifest.get("config", {})
        if theirs.get("labels") != "outcome":
            raise SpeccascadeError(f"--outcome-from {directory}: those traces have no outcome labels")
        differ = sorted(k for k in set(theirs) | set(config) if k not in FREE and theirs.get(k) != config.get(k))
        if differ:
            name, also = differ[0], ", ".join(differ[1:])
            raise SpeccascadeError(f"--outcome-from {directory}: logged with {name}={theirs.get(name)!r}, this run has "
                                   f"{config.get(name)!r}; labels carry over only to the same replies"
                                   + (f" (also differ: {also})" if also else ""))
        table = traces.load_traces(directory).select_columns(list(COLUMNS))[:]  # turn filled in for older traces
        keys = zip(*(table[c] for c in ("example_id", "turn", "position", "position_in_block")))
        values = zip(*(table[c] for c in TOKENS + LABELS))
        return cls(directory, manifest, dict(zip(keys, values)))

    def label(self, example_ids: list[str], turn: int, position: np.ndarray, in_block: np.ndarray, draft: np.ndarray,
              target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``outcome_harm`` and ``outcome_delta`` of these rows; an error names the first row whose tokens differ
        from the labelled one's, or that has none."""
        found = [self.rows.get((e, turn, t, k)) for e, t, k in zip(example_ids, position.tolist(), in_block.tolist())]
        for i, row in enumerate(found):
            if row is None or row[:2] != (int(draft[i]), int(target[i])):
                where = f"example {example_ids[i]!r} turn {turn} position {int(position[i])}"
                got = "no row" if row is None else f"drafted {row[0]} against the target's {row[1]}"
                raise SpeccascadeError(f"--outcome-from {self.directory}: {where} has {got} there, this run drafted "
                                       f"{int(draft[i])} against {int(target[i])}; not the same replies (another model "
                                       "build, or decoding that is not repeatable here)")
        harm, delta = (np.array([row[k] for row in found], dtype=np.float32) for k in (2, 3))
        return harm, delta

    def summary(self) -> dict:
        """The manifest's ``outcome_labels`` entry: the source's cost, and where the labels came from."""
        return {**self.manifest.get("outcome_labels", {}),
                "copied_from": {"traces": str(self.directory), "fingerprint": self.manifest.get("fingerprint")}}

