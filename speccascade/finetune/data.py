"""Supervised fine-tuning data: a task's prompts through the pair's chat template, the reference reply
as the only target, examples packed into rows.

Each example is ``prompt ids + reply ids + EOS``; only the reply and the EOS are labelled (the prompt is
masked). The prompt is tokenised by :meth:`ModelPair.encode`, exactly as the decoders see it, so training
and test prompts match token for token. A step's examples are packed first-fit-decreasing into rows of at
most ``pack_length`` tokens; position ids restart at 0 for every example, which transformers reads as
separate sequences (a block-diagonal causal mask), so no example attends to another.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.tasks import Example, get_task
from ..decoding import ModelPair
from ..errors import SpeccascadeError

IGNORE = -100  # label of an unlabelled position (prompt, padding)


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: the prompt (masked) and the labelled reply, EOS included."""

    prompt: tuple[int, ...]
    reply: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.reply)


def encode_examples(pair: ModelPair, examples: list[Example], chunk: int = 256) -> list[Encoded]:
    """Prompts as ``pair.encode`` tokenises them for decoding; replies as plain text followed by EOS."""
    if not pair.eos_token_ids:
        raise SpeccascadeError(f"model {pair.target_id!r} has no end-of-sequence token to end a reply with")
    eos = pair.eos_token_ids[0]
    encoded = []
    for start in range(0, len(examples), chunk):
        batch = examples[start : start + chunk]
        ids, mask = pair.encode([ex.prompt for ex in batch])
        replies = pair.tokenizer([ex.reference for ex in batch], add_special_tokens=False)["input_ids"]
        for row, row_mask, reply in zip(ids.tolist(), mask.tolist(), replies):
            prompt = tuple(t for t, m in zip(row, row_mask) if m)
            encoded.append(Encoded(prompt, (*reply, eos)))
    return encoded


def pack(examples: list[Encoded], pack_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of whole examples (first-fit decreasing), padded to the longest row.

    Returns ``input_ids``, ``position_ids`` (restarting per example; padding is its own sequence) and
    ``labels`` (``IGNORE`` outside replies), all ``[rows, width]``.
    """
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        if len(ex) > pack_length:
            raise SpeccascadeError(f"an example has {len(ex)} tokens, more than pack_length={pack_length}; raise pack_length")
        slot = next((i for i, r in enumerate(room) if r >= len(ex)), None)
        if slot is None:
            rows.append([])
            room.append(pack_length)
            slot = len(rows) - 1
        rows[slot].append(ex)
        room[slot] -= len(ex)
    width = max(pack_length - r for r in room)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex)
            ids[i, at : at + n] = torch.tensor(ex.prompt + ex.reply)
            positions[i, at : at + n] = torch.arange(n)
            labels[i, at + len(ex.prompt) : at + n] = torch.tensor(ex.reply)
            at += n
        positions[i, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


class StepBatches(Dataset):
    """Item ``s`` is step ``s``'s packed batch: examples ``s * batch_size ...`` of a fixed shuffled order
    (the order is reshuffled on every pass over the examples)."""

    def __init__(self, examples: list[Encoded], steps: int, batch_size: int, pack_length: int, pad_id: int, seed: int) -> None:
        self.examples, self.steps, self.batch_size = examples, steps, batch_size
        self.pack_length, self.pad_id, self.seed = pack_length, pad_id, seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.steps

    def indices(self, step: int) -> list[int]:
        return [self.order(k // len(self.examples))[k % len(self.examples)]
                for k in range(step * self.batch_size, (step + 1) * self.batch_size)]

    def order(self, epoch: int) -> list[int]:
        """The shuffled example order of pass ``epoch`` over the examples."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=generator).tolist()}
        return self._orders[epoch]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        batch = pack([self.examples[i] for i in self.indices(step)], self.pack_length, self.pad_id)
        return batch | {"step": torch.tensor(step)}


class FromStep(Sampler[int]):
    """Steps ``start .. steps - 1``: after a resume, training continues with the next unseen batch."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps

    def __iter__(self):
        return iter(range(self.start, self.steps))

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)


class FinetuneDataModule(pl.LightningDataModule):
    """A task's train split for supervised fine-tuning, one packed batch per optimizer step.

    ``examples`` distinct training examples (default ``steps * batch_size``: every step sees new ones);
    the batches are a pure function of the step, and the loader starts at the trainer's global step,
    so a resumed run sees exactly the batches a run without interruption would.
    """

    def __init__(self, pair: ModelPair, task: str, steps: int, batch_size: int = 16, examples: int | None = None,
                 pack_length: int = 512, data_file: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.pair, self.task, self.steps, self.batch_size = pair, task, steps, batch_size
        self.n_examples = examples or steps * batch_size
        self.pack_length, self.data_file, self.seed = pack_length, data_file, seed
        self.dataset: StepBatches | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            examples = get_task(self.task).examples("train", limit=self.n_examples, data_file=self.data_file, seed=self.seed)
            encoded = encode_examples(self.pair, examples)
            longest = max(len(ex) for ex in encoded)
            if longest > self.pack_length:  # refused before training starts, not at the step that meets it
                raise SpeccascadeError(f"the longest training example has {longest} tokens, more than "
                                       f"pack_length={self.pack_length}; raise pack_length")
            self.dataset = StepBatches(encoded, self.steps, self.batch_size, self.pack_length, self.pair.pad_token_id, self.seed)

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(self.dataset, batch_size=None, sampler=FromStep(start, self.steps))

    def seen(self) -> dict[str, int]:
        """What the whole run trains on: examples (with repeats), distinct examples, tokens and labelled tokens."""
        data = self.dataset
        picked = [data.examples[i] for step in range(data.steps) for i in data.indices(step)]
        return {"examples": len(picked), "distinct_examples": len(data.examples),
                "tokens": sum(len(ex) for ex in picked), "reply_tokens": sum(len(ex.reply) for ex in picked)}
