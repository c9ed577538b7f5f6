"""A drafter with int8 weights: PyTorch's dynamic quantisation of its linear layers, for CPU decoding.

A cached decode step of a small model on a CPU reads every weight it uses once, so its cost follows
the bytes of its weights: int8 weights (one scale per output channel; activations quantised per
step) read a quarter of float32's. Layers that narrow their input (``in_features > out_features``:
an MLP's down projection, whose input carries the outlier activations that per-tensor activation
scales handle worst, and grouped key/value projections) stay in float32: on the arithmetic pair
quantising them too took the drafter's greedy agreement with the target from 0.84 to 0.75 for a
step 0.76 as long. Only the drafter is quantised; the target is untouched, so speculative decoding
stays exact (its output follows the target's ``p`` whatever ``q`` the drafter proposes from) and
only the share of drafts the target accepts can change. An output head that is not a plain linear
layer stays as it is (a head pruned by ``drafter_vocab`` is small already).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import SpeccascadeError

QUANTIZATIONS = ("int8",)


def check_quantization(method: str) -> None:
    """Refuse an unknown method with the flag's name (before any weights load)."""
    if method not in QUANTIZATIONS:
        raise SpeccascadeError(f"--drafter-quantize must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")


def quantize_drafter(model: PreTrainedModel, method: str) -> PreTrainedModel:
    """A copy of ``model`` whose ``nn.Linear`` layers, except those that narrow their input, compute with int8
    weights (``method="int8"``).

    It is a copy, so a drafter that shares layers with the target (a layer subset) leaves the target's
    weights as they were. The quantised kernels (fbgemm, qnnpack) run on the CPU only.
    """
    check_quantization(method)
    if model.device.type != "cpu":
        raise SpeccascadeError(f"--drafter-quantize {method} runs on the CPU only; the drafter is on {model.device}")
    if model.dtype != torch.float32:
        raise SpeccascadeError(f"--drafter-quantize {method} needs a float32 drafter, got {str(model.dtype).removeprefix('torch.')}")
    if not torch.backends.quantized.supported_engines or torch.backends.quantized.supported_engines == ["none"]:
        raise SpeccascadeError(f"--drafter-quantize {method}: this build of torch {torch.__version__} has no quantised CPU kernels")
    with warnings.catch_warnings():  # torch >= 2.10 points eager-mode quantisation users to torchao; the kernels are the same
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), widening_layers(model), inplace=True)
    return quantized.eval()


def widening_layers(model: nn.Module) -> dict[str, torch.ao.quantization.QConfig]:
    """The per-channel int8 settings of every linear layer that does not narrow its input, by module name."""
    return {name: torch.ao.quantization.per_channel_dynamic_qconfig for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.in_features <= module.out_features}
