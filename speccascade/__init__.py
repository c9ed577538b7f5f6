"""speccascade: speculative cascades with learned, calibrated deferral rules."""

from .decoding import Autoregressive, SequentialCascade, SpeculativeCascade, load_pair
from .deferral import rules
from .errors import SpeccascadeError

__version__ = "0.1.0"
__all__ = ["Autoregressive", "SequentialCascade", "SpeculativeCascade", "SpeccascadeError", "load_pair", "rules"]
