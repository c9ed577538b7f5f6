"""Supervised fine-tuning of task-specialised pairs: ``speccascade finetune`` and the presets built with it."""

from .finetune import finetune

__all__ = ["finetune"]
