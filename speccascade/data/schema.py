"""Trace rows: which columns a trace holds and how each block of positions becomes rows.

One row per drafted (on-policy) or teacher-forced (reference) position. Features come from
:mod:`speccascade.deferral.features`; this module adds identifiers and labels (algorithms.md
section 5). Everything here is vectorised over ``[N]`` positions of ``[N, V]`` distributions.
"""

from __future__ import annotations

import numpy as np
import torch

from ..deferral import features as F

ID_COLUMNS = ("example_id", "example_index", "turn", "position", "position_in_block", "draft_token", "target_argmax")
ORACLE_LABELS = ("soft_accept", "p_gap", "draft_is_target_argmax")  # the target's view of the draft
REFERENCE_LABELS = ("reference_token", "loss_q", "loss_p", "gap", "loss_q_greedy", "loss_p_greedy", "gap_greedy")
ON_POLICY_LABELS = ("deferred", "accepted", "examined", "score")
# on-policy, --labels outcome (speccascade.tracing.outcome): does the draft instead of the target's choice change the
# task's answer? 0/1 and the score difference; 0 where they agree, NaN where the position was not examined
OUTCOME_LABELS = ("outcome_harm", "outcome_delta")


def position_rows(
    q: torch.Tensor,
    p: torch.Tensor,
    draft: torch.Tensor | None,
    position_in_block: torch.Tensor,
    block_size: int,
    reference: torch.Tensor | None = None,
    topk: int = 0,
    log_q: torch.Tensor | None = None,
    log_p: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Feature and label columns for ``N`` positions: ``q``, ``p`` ``[N, V]``, tokens ``[N]``.

    ``draft`` is the drafted token (on-policy), or None for the drafter's argmax (reference
    mode); ``reference`` the gold token, when teacher-forced; ``log_q``/``log_p`` optional
    log-probabilities that save recomputing them.
    """
    cols = F.position_features(q, p, (position_in_block + 1).to(q.dtype) / block_size, log_q=log_q, log_p=log_p)
    drafter_argmax = q.argmax(-1)
    draft = drafter_argmax if draft is None else draft
    cols.update(F.token_features(q, p, draft))
    target_argmax = p.argmax(-1)
    cols["draft_token"] = draft
    cols["target_argmax"] = target_argmax
    cols["position_in_block"] = position_in_block
    cols["soft_accept"] = (cols["p_tok"] / cols["q_tok"].clamp_min(F.EPS)).clamp_max(1.0)
    cols["p_gap"] = cols["p_top1"] - cols["p_tok"]
    cols["draft_is_target_argmax"] = (draft == target_argmax).to(q.dtype)
    if reference is not None:
        index = reference.unsqueeze(-1)
        cols["reference_token"] = reference
        cols["loss_q"] = 1 - q.gather(-1, index).squeeze(-1)
        cols["loss_p"] = 1 - p.gather(-1, index).squeeze(-1)
        cols["gap"] = cols["loss_q"] - cols["loss_p"]
        cols["loss_q_greedy"] = (drafter_argmax != reference).to(q.dtype)
        cols["loss_p_greedy"] = (target_argmax != reference).to(q.dtype)
        cols["gap_greedy"] = cols["loss_q_greedy"] - cols["loss_p_greedy"]
    if topk > 0:
        for name, probs in (("q", q), ("p", p)):
            top = probs.topk(topk, dim=-1)
            cols[f"{name}_topk_ids"] = top.indices
            cols[f"{name}_topk_probs"] = top.values
    return cols


def to_numpy(cols: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Move columns to host memory with their trace dtypes (float32 features, int32 ids, float16 hidden)."""
    out = {}
    for name, value in cols.items():
        value = value.detach().cpu()
        if name.endswith("_hidden"):
            out[name] = value.to(torch.float16).numpy()
        elif value.dtype.is_floating_point:
            out[name] = value.to(torch.float32).numpy()
        elif value.dtype == torch.bool:
            out[name] = value.numpy()
        else:
            out[name] = value.to(torch.int32).numpy()
    return out
