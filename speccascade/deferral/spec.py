"""The feature spec's identity, without torch: trace manifests and head checkpoints record it, and their readers
(:mod:`speccascade.data.traces` among them) refuse files of another spec before computing anything.

:func:`check_head` is the one compatibility check between a head and what feeds it (traces or a live pair): every
command that loads a head runs it before a row is scored, so a mismatch is one error naming both sides, never a
tensor size mismatch halfway through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..errors import SpeccascadeError

SPEC_NAME = "speccascade-features"
SPEC_VERSION = 2  # v2 added js, the collision sums and the cross-argmax probabilities
HIDDEN_INPUTS: tuple[str, ...] = ("q_hidden", "p_hidden")  # last-layer hidden states: vector inputs of hidden heads
# Context inputs: what the decoder knows of a drafted position besides the distributions. Like the hidden states they
# are head inputs, not features of the spec (its version does not change): the drafted and the target's token (ids,
# embedded by the head) and the position in the reply. Traces hold them as the columns named here.
ID_INPUTS: tuple[str, ...] = ("draft_token", "target_token")
CONTEXT_INPUTS: tuple[str, ...] = (*ID_INPUTS, "reply_position")
TRACE_COLUMNS: dict[str, str] = {"draft_token": "draft_token", "target_token": "target_argmax", "reply_position": "position"}


def input_order(features: list[str] | tuple[str, ...]) -> list[str]:
    """The order a head's inputs are laid out in its input matrix: token ids first (embedded, not normalised), then
    every other input in ``features`` order (the columns of its input statistics ``mean``/``std``)."""
    return [f for f in features if f in ID_INPUTS] + [f for f in features if f not in ID_INPUTS]


def trace_column(name: str) -> str:
    """The trace column an input is read from (its own name, but for the context inputs)."""
    return TRACE_COLUMNS.get(name, name)


@dataclass(frozen=True)
class Source:
    """What traces or a model pair give a head: ``name`` says which in an error (``traces in DIR``, ``pair 'x'``);
    ``schema_version`` is None for a live pair (no trace schema); ``hidden_widths`` maps each hidden-state input it
    holds (``q_hidden``, ``p_hidden``) to its width; ``tokenizer`` is the fingerprint of its vocabulary and
    ``vocab_size`` its size (None where traces do not record it)."""

    name: str
    feature_spec: Mapping | None
    schema_version: int | None = None
    hidden_widths: Mapping[str, int] = field(default_factory=dict)
    tokenizer: str | None = None
    vocab_size: int | None = None


def spec_name(spec: Mapping | None) -> str:
    """``speccascade-features v2``: a recorded feature spec as text."""
    spec = spec if isinstance(spec, Mapping) else {}
    return f"{spec.get('name')} v{spec.get('version')}"


def head_widths(config: Mapping) -> dict[str, int]:
    """The width a head reads of each hidden-state input: as training recorded it (``provenance.hidden_widths``, where
    that adds up to its input statistics), or, for a head trained before that, the statistics' width shared equally."""
    hidden = [f for f in config["features"] if f in HIDDEN_INPUTS]
    if not hidden:
        return {}
    scalars = sum(f not in HIDDEN_INPUTS and f not in ID_INPUTS for f in config["features"])
    total = len(config["mean"]) - scalars  # the statistics' width of the hidden inputs (token ids have none)
    recorded = (config.get("provenance") or {}).get("hidden_widths") or {}
    if set(recorded) == set(hidden) and sum(recorded.values()) == total:
        return {name: int(recorded[name]) for name in hidden}
    return {name: total // len(hidden) for name in hidden}


def check_head(directory: str, config: Mapping, source: Source) -> None:
    """Refuse a head (its ``config.json`` as ``config``) that cannot read what ``source`` gives: another feature spec,
    traces of a schema version it was not trained on, hidden states of another width (or none), token features
    or token ids over another vocabulary (another tokenizer, or another size). The error names the head and the
    source, and what each has."""
    head = f"head {directory}"
    if spec_name(config.get("feature_spec")) != spec_name(source.feature_spec):
        raise SpeccascadeError(f"{head} was trained on feature spec {spec_name(config.get('feature_spec'))}; "
                               f"{source.name} {'were logged with' if source.schema_version is not None else 'computes'} "
                               f"{spec_name(source.feature_spec)}")
    trained = (config.get("provenance") or {}).get("traces") or []
    schemas = sorted({t["schema_version"] for t in trained if t.get("schema_version") is not None})
    if source.schema_version is not None and schemas and source.schema_version not in schemas:
        raise SpeccascadeError(f"{head} was trained on traces of schema version {', '.join(map(str, schemas))}; "
                               f"{source.name} have schema version {source.schema_version}")
    needs = head_widths(config)
    if needs and {name: source.hidden_widths.get(name) for name in needs} != needs:
        given = ", ".join(f"{name} {source.hidden_widths.get(name, 'none')}" for name in needs)
        verb = "give" if source.schema_version is not None else "gives"
        raise SpeccascadeError(f"{head} reads hidden states of width {_widths(needs)}; {source.name} {verb} {given}"
                               + (" (log them with --hidden-states both)" if source.schema_version is not None else ""))
    tokenizers = sorted({t["tokenizer"] for t in trained if t.get("tokenizer")})
    reads_ids = bool(set(config["features"]) & set(ID_INPUTS))
    token_level = reads_ids or bool(set(config["features"]) & set((config.get("feature_spec") or {}).get("token", ())))
    if reads_ids and source.vocab_size is not None and config.get("vocab_size") != source.vocab_size:
        raise SpeccascadeError(f"{head} embeds token ids of a vocabulary of {config.get('vocab_size')} tokens; "
                               f"{source.name} {'are' if source.schema_version is not None else 'is'} of a vocabulary "
                               f"of {source.vocab_size} tokens")
    if token_level and tokenizers and source.tokenizer and source.tokenizer not in tokenizers:
        raise SpeccascadeError(f"{head} reads token features over the vocabulary of tokenizer {', '.join(tokenizers)}; "
                               f"{source.name} {'are' if source.schema_version is not None else 'is'} of tokenizer "
                               f"{source.tokenizer}")


def _widths(widths: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {width}" for name, width in widths.items())
