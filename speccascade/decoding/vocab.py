"""A drafter whose output head scores only part of the vocabulary (FR-Spec-style pruning, Zhao et al., 2025).

A small drafter spends a large share of its step in the output head: for SmolLM2-135M the head
(49,152 x 576) holds as many weights as 8 of its 30 layers. Scoring only the tokens a task's replies
use makes the drafter's step cheaper. The other tokens get the logit :data:`FILL`, so ``q`` gives
them no mass and the drafter never proposes them; speculative decoding is exact for any ``q``, so
forced defer still reproduces the target (the target's head is untouched).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import SpeccascadeError

FILL = -1e4  # a logit whose softmax weight is exactly 0 in float32 and bfloat16, and whose log stays finite
VOCAB_EXAMPLES = 4096  # train examples whose replies define a task's vocabulary


class SubsetHead(nn.Module):
    """An output head that computes the logits of ``token_ids`` only and fills the rest with :data:`FILL`."""

    def __init__(self, head: nn.Linear, token_ids: Sequence[int]) -> None:
        super().__init__()
        ids = torch.as_tensor(sorted(set(token_ids)), dtype=torch.long, device=head.weight.device)
        self.vocab_size = head.weight.shape[0]
        self.weight = nn.Parameter(head.weight.detach()[ids].clone(), requires_grad=False)
        self.bias = None if head.bias is None else nn.Parameter(head.bias.detach()[ids].clone(), requires_grad=False)
        self.register_buffer("token_ids", ids)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = nn.functional.linear(hidden, self.weight, self.bias)
        logits = scores.new_full((*scores.shape[:-1], self.vocab_size), FILL)
        return logits.index_copy_(-1, self.token_ids, scores)


def restrict_vocabulary(model: PreTrainedModel, token_ids: Sequence[int]) -> PreTrainedModel:
    """``model`` with its output head replaced by a :class:`SubsetHead` over ``token_ids`` (in place).

    The head's rows are copied, so a drafter that shares its head with the target (a layer subset,
    tied embeddings) leaves the target's head as it was.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise SpeccascadeError(f"cannot restrict the vocabulary of {type(model).__name__}: its output head is not a linear layer")
    if not token_ids or min(token_ids) < 0 or max(token_ids) >= head.weight.shape[0]:
        raise SpeccascadeError(f"the drafter's vocabulary must be token ids in [0, {head.weight.shape[0]}), got {len(token_ids)} ids")
    model.set_output_embeddings(SubsetHead(head, token_ids))
    return model


def task_vocabulary(tokenizer, task_name: str, special_ids: Sequence[int] = ()) -> list[int]:
    """The token ids of the replies of up to :data:`VOCAB_EXAMPLES` train examples of a task, and ``special_ids``
    (the end-of-sequence tokens): what a drafter for that task needs to propose."""
    from ..data.tasks import get_task

    examples = get_task(task_name).examples("train", limit=VOCAB_EXAMPLES)
    ids = set(special_ids)
    for batch in range(0, len(examples), 512):
        for row in tokenizer([ex.reference for ex in examples[batch : batch + 512]], add_special_tokens=False)["input_ids"]:
            ids.update(row)
    return sorted(ids)
