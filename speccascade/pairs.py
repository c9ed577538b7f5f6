"""Model pairs by preset, built first where the preset needs it: the one ``load_pair`` users and commands call.

The decoder's loader (:func:`speccascade.decoding.load_pair`) only loads. A preset with a fine-tuning recipe
(``smollm2-135m-arithmetic``) is built here by the fine-tuning stage on first use, cached, and then loaded from
its built directories under its own name; every other pair goes to the loader as given.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .decoding import PRESETS, ModelPair
from .decoding import load_pair as load_built_pair
from .deferral import features as F
from .deferral import rules as R
from .deferral.spec import Source, check_head
from .settings import PairSettings


def load_pair(preset: str | None = None, *, drafter: str | None = None, target: str | None = None, **options: Any) -> ModelPair:
    """:func:`speccascade.decoding.load_pair`, with a recipe preset built first (once, then cached).

    ``options`` are the loader's (``drafter_layers``, ``drafter_vocab``, ``drafter_quantize``, ``device``, ...).
    """
    recipe = PRESETS[preset].recipe if preset in PRESETS else None
    if recipe is not None:
        from .finetune.preset import build  # the fine-tuning stack loads only for the presets that need it

        built_target, built_drafter = build(recipe)
        target = target or str(built_target)
        if drafter is None and options.get("drafter_layers") is None:
            drafter = str(built_drafter)
    return load_built_pair(preset, drafter=drafter, target=target, **options)


def load_settings_pair(settings: PairSettings, device: str | torch.device | None = None) -> ModelPair:
    """The pair a command's settings name (``--models``, or ``--drafter``/``--target``, ``--drafter-vocab``,
    ``--drafter-quantize``)."""
    return load_pair(settings.preset, drafter=settings.drafter, target=settings.target, drafter_vocab=settings.drafter_vocab,
                     drafter_quantize=settings.drafter_quantize, device=device)


def pair_source(pair: ModelPair) -> Source:
    """What a pair gives a head while decoding: this code's feature spec, each model's last hidden states (its width)
    and the tokenizer's fingerprint and vocabulary size."""
    configs = {name: getattr(model, "config", None) for name, model in (("q_hidden", pair.drafter), ("p_hidden", pair.target))}
    widths = {name: getattr(config.get_text_config(), "hidden_size", None) if config is not None else None
              for name, config in configs.items()}
    return Source(f"pair {pair.name!r}", F.spec(), None, {k: v for k, v in widths.items() if v is not None},
                  pair.tokenizer_fingerprint, pair.vocab_size)


def check_heads(rules: Iterable[R.Rule], pair: ModelPair) -> None:
    """Refuse any learned rule whose head cannot read what ``pair`` gives (:func:`~speccascade.deferral.spec.check_head`),
    before anything is decoded."""
    source = None
    for rule in rules:
        if isinstance(rule, R.Learned):
            source = source or pair_source(pair)
            check_head(rule.head.provenance.get("path", "?"), rule.head.config(), source)
