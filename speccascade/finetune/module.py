"""``FinetuneModule``: supervised fine-tuning of a causal LM on labelled reply tokens, optionally with a
DistillSpec-style KL term towards a teacher's distribution (Zhou et al., 2024), full or LoRA."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import pytorch_lightning as pl
import torch
import torch.nn.functional as nnf

from ..decoding.pairs import check_same_tokenizer
from ..errors import SpeccascadeError
from ..listing import split_list
from ..settings import setting
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


def parse_layers(layers: str | list[int] | None) -> list[int] | None:
    """``"0-7,26-29"`` or ``[0, 1, 2]`` -> a list of layer indices (None keeps every layer)."""
    if layers is None or isinstance(layers, list):
        return layers
    out: list[int] = []
    parts = split_list(str(layers), "--layers")
    try:
        for part in parts:
            low, dash, high = part.partition("-")
            out += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    except ValueError:
        raise SpeccascadeError(f"--layers must look like '0-7,26-29' or [0, 1, 2], got {layers!r}") from None
    return out


@dataclass(kw_only=True)
class ModelRecipe:
    """What is trained and how: the model, the optimiser and its schedule, LoRA and distillation.

    ``finetune``'s settings inherit this group; :class:`FinetuneModule` takes it.
    """

    base: str = setting("smollm2-135m", "model to start from: a preset name (its target, e.g. smollm2-135m), a local "
                        "directory or a hub id")
    layers: str | list[int] | None = setting(None, "keep only these decoder layers of base (\"0-7,26-29\" or [0, 1, 2]): "
                                             "a standalone layer-subset drafter with its own weights")
    steps: int = setting(200, "optimizer steps", low=1)
    lr: float = setting(1e-4, "AdamW peak learning rate", above=0.0)
    warmup_steps: int = setting(10, "linear warm-up steps", low=0)
    min_lr_ratio: float = setting(0.1, "the cosine decay ends at min_lr_ratio x lr", low=0.0, high=1.0)
    weight_decay: float = setting(0.0, "AdamW weight decay", low=0.0)
    lora_rank: int = setting(0, "0 = full fine-tuning; r > 0 trains rank-r LoRA adapters (peft), merged on export", low=0)
    lora_alpha: float = setting(32.0, "LoRA scaling numerator")
    lora_dropout: float = setting(0.0, "LoRA dropout", low=0.0, high=1.0)
    lora_targets: list[str] | str | None = setting(None, "module names that get adapters, a list or comma-separated "
                                                   "(default: every attention and MLP projection)")
    teacher: str | None = setting(None, "model directory (or preset / hub id) whose distribution the model is distilled "
                                  "towards, and whose held-out quality and greedy agreement are reported beside the model's")
    distill_weight: float = setting(0.0, "w in (1 - w) x cross-entropy + w x KL(teacher || model) (DistillSpec-style)",
                                    low=0.0, high=1.0)
    distill_temperature: float = setting(1.0, "temperature of both distributions in the KL term", above=0.0)

    def check_recipe(self) -> None:
        """Parse ``layers`` into indices and ``lora_targets`` into names; refuse repeated or negative indices, an empty
        list, and distillation without a teacher."""
        self.layers = parse_layers(self.layers)
        if self.lora_targets is not None:
            self.lora_targets = split_list(self.lora_targets, "--lora-targets")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0):
            raise SpeccascadeError(f"--layers must be distinct indices >= 0, got {self.layers}")
        if self.distill_weight > 0 and not self.teacher:
            raise SpeccascadeError("--distill-weight > 0 needs a teacher model (--teacher DIR)")
        if self.lora_targets is not None and self.lora_rank == 0:
            raise SpeccascadeError("--lora-targets names the modules LoRA adapts; it needs --lora-rank > 0")


class FinetuneModule(pl.LightningModule):
    """A causal LM trained on the reply tokens of packed batches, as its :class:`ModelRecipe` says.

    With a teacher and ``distill_weight`` w > 0 the loss is
    (1 - w) * cross-entropy(reference) + w * T^2 * KL(p_teacher^T || q_student^T). The learning rate warms up
    linearly over ``warmup_steps`` and decays on a cosine to ``min_lr_ratio * lr``. The hyperparameters are
    the recipe's fields, as plain values (a checkpoint loads with ``weights_only=True``).
    """

    def __init__(self, recipe: ModelRecipe) -> None:
        super().__init__()
        self.save_hyperparameters({f.name: getattr(recipe, f.name) for f in fields(ModelRecipe)} |
                                  {"layers": parse_layers(recipe.layers)})
        hp = self.hparams
        model, self.tokenizer, self.base_id = load_model(hp.base)
        if hp.layers is not None:
            model = standalone_subset(model, hp.layers)
        if hp.lora_rank > 0:
            model = lora_wrap(model, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, hp.lora_targets)
        self.model = model
        self.model.train()
        # kept out of the module's children: not trained, not checkpointed, not moved by Lightning
        self._teacher: list[torch.nn.Module] = []
        if hp.teacher is not None and hp.distill_weight > 0:
            teacher_model, teacher_tokenizer, teacher_id = load_model(hp.teacher)
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
