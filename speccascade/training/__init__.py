"""Training deferral heads on traces: data module, Lightning module, objectives, train-deferral."""

from .data import TraceDataModule
from .module import DeferralModule
from .train import train_deferral

__all__ = ["DeferralModule", "TraceDataModule", "train_deferral"]
