"""speccascade: speculative cascades with learned, calibrated deferral rules.

The decoders, ``load_pair`` and ``rules`` load on first use: every ``import speccascade.PART`` runs this file
first, and reading a trace directory (:mod:`speccascade.data`) must not load torch, the decoder or Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import SpeccascadeError
from .version import __version__

EXPORTS = {"Autoregressive": "decoding", "SequentialCascade": "decoding", "SpeculativeCascade": "decoding",
           "load_pair": "pairs", "rules": "deferral.rules"}  # each public name -> where it is defined (rules: a module)
__all__ = ["Autoregressive", "SequentialCascade", "SpeculativeCascade", "SpeccascadeError", "__version__", "load_pair", "rules"]


def __getattr__(name: str) -> Any:
    """A public name, imported from its part when first asked for (``from speccascade import load_pair``)."""
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{EXPORTS[name]}", __name__)
    value = module if module.__name__.endswith(f".{name}") else getattr(module, name)
    globals()[name] = value
    return value
