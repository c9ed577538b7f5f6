"""Model pairs, sampling, the speculative-cascade decoder and its baselines."""

from .baselines import Autoregressive, SequentialCascade
from .base import Decoder
from .cascade import BlockEvent, SpeculativeCascade
from .pairs import ModelPair, layer_subset
from .presets import PRESETS, load_pair, tiny_random_pair, tiny_random_t5_pair
from .sampling import Sampler
from .state import DecodeState, GenerateOutput
from .stats import DecodeStats

__all__ = [
    "PRESETS", "Autoregressive", "BlockEvent", "DecodeState", "DecodeStats", "Decoder", "GenerateOutput", "ModelPair",
    "Sampler", "SequentialCascade", "SpeculativeCascade", "layer_subset", "load_pair", "tiny_random_pair",
    "tiny_random_t5_pair",
]
