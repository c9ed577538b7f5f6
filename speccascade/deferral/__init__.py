"""Deferral: the feature spec (``features``), the fixed and learned rules (``rules``), and the learned heads' networks and checkpoints (``heads``)."""

from . import features, rules

__all__ = ["features", "rules"]
