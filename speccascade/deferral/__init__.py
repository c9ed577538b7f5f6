"""Deferral: the feature spec (``features``, its identity in ``spec``), the fixed and learned rules (``rules``), and the
learned heads' networks and checkpoints (``heads``). Import the submodule you need: this package imports none of them,
so that reading ``spec`` loads no torch."""

__all__ = ["features", "heads", "rules", "spec"]
