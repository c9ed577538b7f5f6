"""``TraceDataModule``: trace directories as train/validation tensors for a deferral head.

The split is by example (a stable hash of ``example_id``), never by row, so no example leaks
across it. Rows stay in memory-mapped Arrow files (``datasets``); batches are read as slices.
Rows with NaN or infinite inputs or labels are dropped, and the count is printed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytorch_lightning as pl
import torch
from datasets import Dataset, concatenate_datasets
from torch.utils.data import DataLoader

from ..data.traces import load_traces, read_manifest
from ..deferral.features import trace_context
from ..deferral.spec import CONTEXT_INPUTS, ID_INPUTS, input_order, trace_column
from ..errors import SpeccascadeError

LABELS = {  # the label columns each objective needs
    "gap": ("gap",),
    "classification": ("gap",),
    "relaxed": ("loss_q", "loss_p", "tv"),
    "outcome": ("outcome_harm", "p_gap"),  # on-policy traces logged with --labels outcome
}


def check_columns(columns: list[str], features: list[str], objective: str) -> list[str]:
    """The columns a head with ``features`` trained on ``objective`` reads (features, then labels; a context input's
    trace column, :data:`~speccascade.deferral.spec.TRACE_COLUMNS`), refused in one line where ``columns`` (the
    traces') lack any."""
    if objective not in LABELS:
        raise SpeccascadeError(f"unknown objective {objective!r}; choose one of {', '.join(LABELS)}")
    needed = list(dict.fromkeys([*(trace_column(f) for f in features), *LABELS[objective]]))
    missing = [c for c in needed if c not in columns]
    if missing:
        raise SpeccascadeError(f"traces lack columns {missing} needed by objective {objective!r} and the head's features "
                               "(loss columns come from --mode reference traces)")
    return needed


def in_validation(example_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class _Batches(torch.utils.data.Dataset):
    """Row slices of an Arrow-backed dataset as float tensors (features ``x``, labels ``y``)."""

    def __init__(self, rows: Dataset, features: list[str], labels: list[str]) -> None:
        self.rows, self.features, self.labels = rows, features, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, index: list[int]) -> dict[str, torch.Tensor]:
        batch = self.rows[index]
        return {
            "x": torch.tensor(input_matrix(batch, self.features), dtype=torch.float32),
            "y": {name: torch.tensor(batch[name], dtype=torch.float32) for name in self.labels},
        }


def input_matrix(columns, features: list[str]) -> np.ndarray:
    """``[N, D]`` inputs in :func:`~speccascade.deferral.spec.input_order`: scalar features as one column each,
    vector columns (hidden states) whole, context inputs derived from their trace columns as the decoder derives
    them (:func:`~speccascade.deferral.features.trace_context`)."""
    order = input_order(features)
    context = trace_context({trace_column(f): torch.as_tensor(np.asarray(columns[trace_column(f)]))
                             for f in order if f in CONTEXT_INPUTS}, order)
    parts = [context[f].numpy() if f in context else np.asarray(columns[f]) for f in order]
    return np.concatenate([p.astype(np.float32) if p.ndim == 2 else p.astype(np.float32)[:, None] for p in parts], axis=1)


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle that is a function of (seed, epoch): a run resumed at epoch k sees the rows in the order
    an uninterrupted run does (Lightning calls :meth:`set_epoch` before each epoch)."""

    def __init__(self, rows: int, seed: int) -> None:
        self.rows, self.seed, self.epoch = rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows

    def __iter__(self):
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.rows).tolist())


def _identity(batch):
    return batch


class TraceDataModule(pl.LightningDataModule):
    """Train/validation batches of ``features`` and the objective's labels from trace directories; token ids must
    lie below ``vocab_size`` (the head's embedding) where the features hold any."""

    def __init__(
        self,
        traces: list[str],
        features: list[str],
        objective: str = "classification",
        val_fraction: float = 0.2,
        batch_size: int = 4096,
        seed: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if objective not in LABELS:
            raise SpeccascadeError(f"unknown objective {objective!r}; choose one of {', '.join(LABELS)}")
        self.labels = list(LABELS[objective])
        self.manifests = [read_manifest(t) for t in traces]
        self.train_rows: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        hp = self.hparams
        rows = concatenate_datasets([load_traces(t) for t in hp.traces]) if len(hp.traces) > 1 else load_traces(hp.traces[0])
        if len(rows) == 0:
            raise SpeccascadeError(f"traces {', '.join(hp.traces)} hold no rows")
        needed = check_columns(rows.column_names, hp.features, hp.objective)
        finite = rows.map(
            lambda b: {"_ok": np.isfinite(input_matrix(b, needed)).all(-1)},
            batched=True, batch_size=65536,
        )
        dropped = len(finite) - sum(finite["_ok"])
        if dropped:
            why = " (outcome labels are NaN where the cascade examined no draft)" if hp.objective == "outcome" else ""
            print(f"train-deferral: dropped {dropped} rows with NaN or infinite values{why}")
            rows = finite.filter(lambda b: b["_ok"], batched=True).remove_columns("_ok")
        val = np.array([in_validation(e, hp.val_fraction, hp.seed) for e in rows["example_id"]])
        self.val_all = rows.select(np.flatnonzero(val))  # every column, for the offline comparison
        self.train_rows = rows.select(np.flatnonzero(~val)).select_columns(needed)
        self.val_rows = self.val_all.select_columns(needed)
        if len(self.train_rows) == 0 or len(self.val_rows) == 0:
            raise SpeccascadeError(f"the split by example left an empty {'train' if len(self.train_rows) == 0 else 'validation'} set; log more examples")
        ids = [f for f in hp.features if f in ID_INPUTS]
        for name in ids:
            largest = int(max(np.max(part.with_format("numpy")[trace_column(name)]) for part in (self.train_rows, self.val_rows)))
            if largest >= hp.vocab_size:
                raise SpeccascadeError(f"traces {', '.join(hp.traces)} hold {name} id {largest}, outside the head's "
                                       f"vocabulary of {hp.vocab_size} tokens")
        scaled = [f for f in hp.features if f not in ID_INPUTS]  # token ids are embedded, not normalised
        total = total_sq = np.zeros(0)  # input statistics streamed over the memory-mapped rows
        columns = [trace_column(f) for f in scaled]
        for i, chunk in enumerate(self.train_rows.select_columns(columns).with_format("numpy").iter(batch_size=65536) if scaled else ()):
            x = input_matrix(chunk, scaled).astype(np.float64)
            total = x.sum(0) if i == 0 else total + x.sum(0)
            total_sq = (x**2).sum(0) if i == 0 else total_sq + (x**2).sum(0)
        mean = total / len(self.train_rows)
        self.mean = mean.tolist()
        self.std = (np.sqrt(np.maximum(total_sq / len(self.train_rows) - mean**2, 0.0)) + 1e-6).tolist()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self.train_rows, self.hparams.features, self.labels), batch_size=self.hparams.batch_size,
                          sampler=EpochShuffle(len(self.train_rows), self.hparams.seed), collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self.val_rows, self.hparams.features, self.labels), batch_size=self.hparams.batch_size,
                          collate_fn=_identity)
