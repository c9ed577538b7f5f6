"""Deferral: the feature spec and the rules (fixed and, later, learned)."""

from . import features, rules

__all__ = ["features", "rules"]
