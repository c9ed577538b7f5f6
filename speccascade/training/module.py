"""``DeferralModule``: trains a :class:`~speccascade.deferral.heads.DeferralHead` against an objective
of algorithms.md section 5."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as nnf
from torchmetrics.classification import BinaryAUROC

from ..deferral.heads import DeferralHead


def objective_loss(objective: str, score: torch.Tensor, y: dict[str, torch.Tensor], alpha: float | torch.Tensor,
                   gap_weight: float = 0.0) -> torch.Tensor:
    """gap: squared error on ``loss_q - loss_p``; classification: BCE on ``1[gap > 0]`` weighted by ``|gap|``;
    relaxed: ``E[(1 - s) loss_q + s (loss_p + alpha D_TV)]`` with ``s = sigmoid(score)``; outcome: BCE on
    ``(1 - gap_weight) outcome_harm + gap_weight p_gap`` (the outcome label, optionally mixed with the
    target-as-oracle gap ``max p - p(x)`` of the same on-policy rows)."""
    if objective == "outcome":
        label = (1 - gap_weight) * y["outcome_harm"] + gap_weight * y["p_gap"].clamp(0, 1)
        return nnf.binary_cross_entropy_with_logits(score, label)
    if objective == "gap":
        return nnf.mse_loss(score, y["gap"])
    if objective == "classification":
        weight = y["gap"].abs()
        return nnf.binary_cross_entropy_with_logits(score, (y["gap"] > 0).float(), weight=weight) / weight.mean().clamp_min(1e-8)
    s = torch.sigmoid(score)
    return ((1 - s) * y["loss_q"] + s * (y["loss_p"] + alpha * y["tv"])).mean()


def defer_target(objective: str, y: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """Whether deferring was right for each row (for AUROC): the gap is positive (relaxed: beyond the cost;
    outcome: the draft changes the answer for the worse)."""
    if objective == "outcome":
        return (y["outcome_harm"] > 0.5).long()
    if objective == "relaxed":
        return (y["loss_q"] - y["loss_p"] > alpha * y["tv"]).long()
    return (y["gap"] > 0).long()


class DeferralModule(pl.LightningModule):
    """A deferral head and its objective; logs train/val loss and validation AUROC.

    With ``alpha_range`` (relaxed objective) every training row draws its own alpha from that
    range and the head sees it as an input, so one head serves the whole trade-off curve;
    validation uses ``alpha``.
    """

    def __init__(
        self,
        features: list[str],
        mean: list[float],
        std: list[float],
        kind: str = "mlp",
        hidden: int = 64,
        depth: int = 2,
        objective: str = "classification",
        alpha: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        alpha_range: tuple[float, float] | None = None,
        gap_weight: float = 0.0,
        vocab_size: int | None = None,
        embed_dim: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if alpha_range is not None:  # alpha is one more input, normalised like the uniform it is drawn from
            low, high = alpha_range
            features, mean, std = [*features, "alpha"], [*mean, (low + high) / 2], [*std, max(high - low, 1e-6) / 12**0.5]
        self.head = DeferralHead(features, kind=kind, hidden=hidden, depth=depth, objective=objective, mean=mean, std=std,
                                 vocab_size=vocab_size, embed_dim=embed_dim)
        self.val_auroc = BinaryAUROC()

    def _inputs(self, x: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        if self.hparams.alpha_range is None:
            return x
        return torch.cat([x, torch.as_tensor(alpha, dtype=x.dtype).expand(len(x)).unsqueeze(1)], dim=1)

    def training_step(self, batch, batch_idx):
        alpha = self.hparams.alpha
        if self.hparams.alpha_range is not None:
            low, high = self.hparams.alpha_range
            alpha = low + (high - low) * torch.rand(len(batch["x"]))
        loss = objective_loss(self.hparams.objective, self.head(self._inputs(batch["x"], alpha)), batch["y"], alpha,
                              self.hparams.gap_weight)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["x"]))
        return loss

    def validation_step(self, batch, batch_idx):
        score = self.head(self._inputs(batch["x"], self.hparams.alpha))
        loss = objective_loss(self.hparams.objective, score, batch["y"], self.hparams.alpha, self.hparams.gap_weight)
        self.val_auroc.update(score, defer_target(self.hparams.objective, batch["y"], self.hparams.alpha))
        self.log("val_loss", loss, prog_bar=True, batch_size=len(batch["x"]), sync_dist=True)
        self.log("val_auroc", self.val_auroc, prog_bar=True, batch_size=len(batch["x"]))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The random state travels in the checkpoint: a resumed run draws the alphas an uninterrupted run does."""
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
