"""Supervised fine-tuning of task-specialised pairs: ``speccascade finetune`` and the presets built with it."""

from .train import finetune

__all__ = ["finetune"]
