"""speccascade: speculative cascades with learned, calibrated deferral rules."""

from .decoding import Autoregressive, SequentialCascade, SpeculativeCascade
from .deferral import rules
from .errors import SpeccascadeError
from .pairs import load_pair
from .version import __version__

__all__ = ["Autoregressive", "SequentialCascade", "SpeculativeCascade", "SpeccascadeError", "load_pair", "rules"]
