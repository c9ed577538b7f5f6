"""Learned deferral heads: small networks over the feature spec, saved as ``config.json`` + ``model.safetensors``.

Every constructor argument is JSON and lands in ``config.json`` (``PyTorchModelHubMixin``), so a
checkpoint carries its architecture, the feature spec and feature list it was trained on, the
input normalisation, the objective, calibration and recommended operating points (architecture.md
section 6). Inputs are normalised inside ``forward`` with the training split's statistics; token ids
(``draft_token``, ``target_token``) go through the head's own small embedding instead, whose vocabulary
size ``config.json`` records.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import SpeccascadeError
from ..outdir import fits
from ..report import read_json, write_json
from . import features as F
from .spec import CONTEXT_INPUTS, HIDDEN_INPUTS, ID_INPUTS, input_order

KINDS = ("logistic", "mlp")
CONDITIONING = ("alpha",)  # inputs that are no feature: the trade-off a relaxed head is asked for
OBJECTIVES = ("gap", "classification", "relaxed", "outcome")
DEFERRAL_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the rates whose thresholds a head records


class DeferralHead(nn.Module, PyTorchModelHubMixin):
    """``h(phi) -> score`` per position (or per candidate token for token-level heads).

    ``objective`` fixes what the score means: ``gap`` regresses the quality gap
    ``loss_q - loss_p`` (defer iff the predicted gap > threshold); ``classification``
    ``relaxed`` and ``outcome`` (trained on outcome labels: does the draft change the answer?) give a
    deferral logit (defer iff calibrated sigmoid > threshold).
    """

    def __init__(
        self,
        features: list[str],
        kind: str = "mlp",
        hidden: int = 64,
        depth: int = 2,
        objective: str = "classification",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        feature_spec: dict | None = None,
        calibration: dict | None = None,
        operating_points: dict | None = None,
        provenance: dict | None = None,
        metrics: dict | None = None,
        vocab_size: int | None = None,
        embed_dim: int = 8,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise SpeccascadeError(f"unknown head {kind!r}; choose one of {', '.join(KINDS)}")
        if objective not in OBJECTIVES:
            raise SpeccascadeError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        unknown = [f for f in features if f not in F.ALL_FEATURES + CONDITIONING + HIDDEN_INPUTS + CONTEXT_INPUTS]
        if unknown:
            raise SpeccascadeError(f"features {unknown} are not in the feature spec {F.SPEC_NAME} v{F.SPEC_VERSION}")
        self.features = list(features)
        self.kind, self.objective, self.hidden, self.depth = kind, objective, hidden, depth
        self.feature_spec = feature_spec or F.spec()
        self.calibration = calibration or {"method": "none"}
        self.operating_points = operating_points or {}
        self.provenance = provenance or {}
        self.metrics = metrics or {}
        if mean is None and any(f in HIDDEN_INPUTS for f in features):
            raise SpeccascadeError("a head on hidden states needs its input statistics (mean, std) to know their width")
        self.ids = [f for f in features if f in ID_INPUTS]
        self.vocab_size, self.embed_dim = vocab_size, embed_dim
        if self.ids and not (isinstance(vocab_size, int) and vocab_size >= 1 and isinstance(embed_dim, int) and embed_dim >= 1):
            raise SpeccascadeError(f"a head on token ids ({', '.join(self.ids)}) needs its vocabulary size and embedding "
                                   f"width (whole numbers >= 1), got vocab_size {vocab_size}, embed_dim {embed_dim}")
        self.embed = nn.Embedding(vocab_size, embed_dim) if self.ids else None
        n = len(mean) if mean is not None else len(features) - len(self.ids)
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * n))
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * n))
        n += len(self.ids) * embed_dim
        if kind == "logistic":
            self.net = nn.Linear(n, 1)
        else:
            layers, width = [], n
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), nn.GELU()]
                width = hidden
            self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def record_thresholds(self, thresholds: dict[float, float], default: float) -> None:
        """Keep the threshold that defers each deferral rate (``config.json`` keys them by the rate as text,
        ``"0.2"``) and the ``default`` threshold."""
        self.operating_points = {f"{rate:g}": threshold for rate, threshold in thresholds.items()} | {"default": default}

    def thresholds(self) -> dict[float, float]:
        """The recorded thresholds by deferral rate, the config's text keys read as numbers (here, once)."""
        return {float(rate): threshold for rate, threshold in self.operating_points.items() if rate != "default"}

    @property
    def granularity(self) -> str:
        """``token`` when any input is a token-level feature or the drafted token itself (its decision then
        depends on the candidate, so the decoder asks it of every candidate token)."""
        return "token" if any(f in F.TOKEN_FEATURES + ("draft_token",) for f in self.features) else "position"

    def config(self) -> dict:
        """Every constructor argument as JSON: what ``config.json`` holds."""
        return {
            "features": self.features, "kind": self.kind, "hidden": self.hidden, "depth": self.depth,
            "objective": self.objective, "mean": self.mean.tolist(), "std": self.std.tolist(),
            "feature_spec": self.feature_spec, "calibration": self.calibration,
            "operating_points": self.operating_points, "provenance": self.provenance, "metrics": self.metrics,
        } | ({"vocab_size": self.vocab_size, "embed_dim": self.embed_dim} if self.ids else {})

    def save(self, directory) -> None:
        """Write ``config.json`` + ``model.safetensors`` (no pickle)."""
        self.save_pretrained(directory)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The weights, then ``config.json`` through the one JSON writer (strict: an undefined metric is null) in
        the mixin's own format (sorted keys, indent 2), which keeps the mixin from writing it again."""
        super()._save_pretrained(save_directory)
        write_json(Path(save_directory) / "config.json", self.config(), sort_keys=True)

    @classmethod
    def load(cls, directory: str | Path) -> "DeferralHead":
        """A head checkpoint, every part checked: a config that is no valid head config, weights that are
        unreadable (truncated) or do not fit the config are a :class:`SpeccascadeError` naming the problem."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = read_config(directory)
        try:
            head = cls(**config)
        except TypeError as err:
            raise SpeccascadeError(f"{directory / 'config.json'} is not a deferral head's config: {err}") from None
        try:
            state = load_file(directory / "model.safetensors")
        except Exception as err:
            raise SpeccascadeError(f"{directory / 'model.safetensors'} is unreadable (truncated or corrupt): "
                                   f"{' '.join(str(err).split())}") from None
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise SpeccascadeError(f"the weights in {directory} do not fit its config.json: {detail[:300]}") from None
        return head.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw score ``[...]`` from inputs ``[..., D]`` laid out by :func:`~speccascade.deferral.spec.input_order`:
        token ids first (embedded), then the rest (normalised)."""
        k = len(self.ids)
        rest = (x[..., k:] - self.mean) / self.std.clamp_min(1e-6)
        if k:
            rest = torch.cat([self.embed(x[..., :k].long()).flatten(-2), rest], dim=-1)
        return self.net(rest).squeeze(-1)

    @property
    def needs_hidden(self) -> bool:
        return any(f in HIDDEN_INPUTS for f in self.features)

    def inputs(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        """Named inputs (live, or trace columns with the context inputs already derived) as ``[..., D]``: scalars
        broadcast to one shape, hidden state vectors ``[..., H]`` appended whole, in
        :func:`~speccascade.deferral.spec.input_order` (token ids as floats: exact below 2^24)."""
        missing = [name for name in self.features if name not in f]
        if missing:
            raise SpeccascadeError(f"the head needs features {missing} that were not provided")
        order = input_order(self.features)
        columns = [f[name].to(self.mean.dtype) for name in order]
        columns = [c if name in HIDDEN_INPUTS else c.unsqueeze(-1) for name, c in zip(order, columns)]
        shape = torch.broadcast_shapes(*(c.shape[:-1] for c in columns))
        return torch.cat([c.expand(*shape, c.shape[-1]) for c in columns], dim=-1)

    def probability(self, score: torch.Tensor) -> torch.Tensor:
        """Calibrated deferral probability from a raw logit (Platt scaling, isotonic regression, or none)."""
        method = self.calibration.get("method")
        if method == "platt":
            return torch.sigmoid(self.calibration["a"] * score + self.calibration["b"])
        if method == "isotonic":
            return _interpolate(score, self.calibration["x"], self.calibration["y"])
        return torch.sigmoid(score)


def fingerprint(directory: str | Path) -> str:
    """A saved head's identity: the first 16 hex digits of the sha256 of its ``config.json`` and weights (the
    key of its points in ``evaluate`` and the name of its W&B ``model`` artifact)."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()[:16]


def read_config(directory: str | Path) -> dict:
    """A head's ``config.json``, checked: a JSON object whose features, input statistics, calibration
    and operating points are consistent (the weights are checked against it by :meth:`DeferralHead.load`)."""
    path = fits(directory, "head directory") / "config.json"
    if not path.is_file() or not (Path(directory) / "model.safetensors").is_file():
        raise SpeccascadeError(f"{directory} is not a deferral head (config.json and model.safetensors expected)")
    config = read_json(path)
    problem = _config_problem(config)
    if problem:
        raise SpeccascadeError(f"{path} is not a usable head config: {problem}")
    return config


def _all_numbers(values, finite: bool = True) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or not finite) for v in values)


def _is_rate(key: str) -> bool:
    try:
        return 0.0 <= float(key) <= 1.0
    except ValueError:
        return False


def _config_problem(config: dict) -> str | None:
    """What makes a head config unusable, or None."""
    features = config.get("features")
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        return "'features' must be a non-empty list of names"
    mean, std = config.get("mean"), config.get("std")
    if mean is not None or std is not None:
        if not (_all_numbers(mean) and _all_numbers(std) and len(mean) == len(std)):
            return "'mean' and 'std' must be lists of finite numbers of the same length"
        scalars = sum(f not in HIDDEN_INPUTS and f not in ID_INPUTS for f in features)
        hidden = sum(f in HIDDEN_INPUTS for f in features)
        if (hidden == 0 and len(mean) != scalars) or (hidden and (len(mean) <= scalars or (len(mean) - scalars) % hidden)):
            return f"its {len(features)} features do not match its {len(mean)} input statistics"
    calibration = config.get("calibration") or {"method": "none"}
    method = calibration.get("method") if isinstance(calibration, dict) else None
    if method == "platt" and not _all_numbers([calibration.get("a"), calibration.get("b")]):
        return "Platt calibration needs numeric coefficients 'a' and 'b'"
    if method == "isotonic" and not (_all_numbers(calibration.get("x")) and _all_numbers(calibration.get("y"))
                                     and len(calibration["x"]) == len(calibration["y"]) >= 1):
        return "isotonic calibration needs knots 'x' and 'y' of the same length"
    if method not in ("none", "platt", "isotonic"):
        return f"unknown calibration {method!r}"
    points = config.get("operating_points") or {}
    if not isinstance(points, dict) or not _all_numbers(list(points.values()), finite=False) or any(v != v for v in points.values()):
        return "'operating_points' must map deferral rates to numeric thresholds"
    if not all(_is_rate(key) for key in points if key != "default"):
        return "'operating_points' keys must be deferral rates in [0, 1] (or 'default')"
    return None


def _interpolate(x: torch.Tensor, xs: list[float], ys: list[float]) -> torch.Tensor:
    """Piecewise-linear ``np.interp`` in torch (clipped at both ends), for isotonic calibration."""
    knots_x = torch.tensor(xs, dtype=x.dtype, device=x.device)
    knots_y = torch.tensor(ys, dtype=x.dtype, device=x.device)
    if len(xs) == 1:
        return knots_y.expand_as(x).clone()
    x = x.clamp(knots_x[0], knots_x[-1])
    right = torch.searchsorted(knots_x, x.contiguous()).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = knots_x[right - 1], knots_x[right], knots_y[right - 1], knots_y[right]
    weight = torch.where(x1 > x0, (x - x0) / (x1 - x0).clamp_min(1e-12), torch.zeros_like(x))
    return y0 + weight * (y1 - y0)
