"""``FinetuneModule``: supervised fine-tuning of a causal LM on labelled reply tokens, optionally with a
DistillSpec-style KL term towards a teacher's distribution (Zhou et al., 2024), full or LoRA."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as nnf

from ..decoding.pairs import check_same_tokenizer
from .data import IGNORE
from .models import load_model, lora_wrap, standalone_subset


def labelled_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, V]`` at the N positions whose next token is labelled, and those labels ``[N]``.

    The language-model head runs only at labelled positions (a reply is a small part of each example),
    and the packed batch is read as separate sequences (position ids restart, no KV cache).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float(), labels[keep]


class FinetuneModule(pl.LightningModule):
    """A causal LM trained on the reply tokens of packed batches.

    base: preset name, local directory or hub id of the model to start from.
    layers: keep only these decoder layers of ``base`` (a standalone layer-subset drafter with its own weights).
    lora_rank: 0 trains every weight; r > 0 trains rank-r LoRA adapters (peft), merged into the weights on export.
    teacher: a model whose distribution the student is pulled towards with weight ``distill_weight``:
        loss = (1 - w) * cross-entropy(reference) + w * T^2 * KL(p_teacher^T || q_student^T).
    The learning rate warms up linearly over ``warmup_steps`` and decays on a cosine to ``min_lr_ratio * lr``.
    """

    def __init__(
        self,
        base: str,
        steps: int,
        layers: list[int] | None = None,
        lr: float = 1e-4,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.0,
        lora_rank: int = 0,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        teacher: str | None = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        model, self.tokenizer, self.base_id = load_model(base)
        if layers is not None:
            model = standalone_subset(model, layers)
        if lora_rank > 0:
            model = lora_wrap(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
        self.model = model
        self.model.train()
        # kept out of the module's children: not trained, not checkpointed, not moved by Lightning
        self._teacher: list[torch.nn.Module] = []
        if teacher is not None and distill_weight > 0:
            teacher_model, teacher_tokenizer, teacher_id = load_model(teacher)
            check_same_tokenizer(teacher_tokenizer, self.tokenizer, teacher_id, self.base_id)
            self._teacher.append(teacher_model.eval().requires_grad_(False))

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_train_start(self) -> None:
        self.model.train()

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, labels = labelled_logits(self.model, batch)
        out = {"ce": nnf.cross_entropy(logits, labels)}
        out["loss"] = out["ce"]
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits, _ = labelled_logits(self.teacher, batch)
            t = self.hparams.distill_temperature
            vocab = min(logits.shape[-1], teacher_logits.shape[-1])
            log_q = nnf.log_softmax(logits[:, :vocab] / t, -1)
            log_p = nnf.log_softmax(teacher_logits[:, :vocab] / t, -1)
            out["kl"] = nnf.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * t * t
            out["agreement"] = (logits[:, :vocab].argmax(-1) == teacher_logits[:, :vocab].argmax(-1)).float().mean()
            w = self.hparams.distill_weight
            out["loss"] = (1 - w) * out["ce"] + w * out["kl"]
        return out

    def training_step(self, batch, batch_idx):
        out = self.losses(batch)
        n = int((batch["labels"] != IGNORE).sum())
        self.log("train_loss", out["loss"], prog_bar=True, batch_size=n)
        self.log("train_ce", out["ce"], batch_size=n)
        for key in ("kl", "agreement"):
            if key in out:
                self.log(f"train_{key}", out[key], prog_bar=key == "agreement", batch_size=n)
        self.log("data_step", batch["step"].float(), batch_size=1)  # which batch: a resumed run continues the order
        return out["loss"]

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup, total, floor = self.hparams.warmup_steps, self.hparams.steps, self.hparams.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
