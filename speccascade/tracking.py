"""W&B settings shared by every command: offline first, so nothing ever waits on the network."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from .errors import SpeccascadeError
from .report import read_json
from .version import __version__

WANDB_MODES = ("offline", "online", "disabled")


def default_wandb_mode() -> str:
    """``WANDB_MODE`` if set; online only where W&B credentials are configured; else offline."""
    if os.environ.get("WANDB_MODE") in WANDB_MODES:
        return os.environ["WANDB_MODE"]
    try:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_key = bool(os.environ.get("WANDB_API_KEY"))
    return "online" if has_key else "offline"


def resolve_wandb_mode(mode: str | None) -> str:
    mode = mode or default_wandb_mode()
    if mode not in WANDB_MODES:
        raise SpeccascadeError(f"unknown wandb mode {mode!r}; choose one of {', '.join(WANDB_MODES)}")
    return mode


def start_run(out: Path, project: str, mode: str, job_type: str, config: dict, group: str | None = None):
    """A W&B run saved under ``out/wandb``, in ``group`` (a pipeline's runs together), with the speccascade
    version in its config; quiet unless the command line runs verbose (:mod:`speccascade.runtime`)."""
    import wandb

    from . import runtime

    settings = wandb.Settings(silent=runtime.quiet(), console="off" if runtime.quiet() else "auto")
    return wandb.init(project=project, mode=mode, dir=str(out), job_type=job_type, group=group,
                      config={**config, "speccascade_version": __version__}, settings=settings)


def trace_artifact(directory: str | Path):
    """Trace directory as a ``dataset`` artifact by reference: its manifest as a file, each shard as a
    ``file://`` reference (nothing is uploaded, no shard is read again: the manifest, whose digest is the
    artifact's, already holds every shard's sha256). Named after the traces' fingerprint, so the run that
    logs the traces and every run that reads them name the same version."""
    import wandb

    from .data.traces import MANIFEST, read_manifest

    directory = Path(directory).resolve()
    manifest = read_manifest(directory)
    keys = ("task", "split", "mode", "drafter", "target", "rows", "examples", "fingerprint", "schema_version",
            "speccascade_version")
    artifact = wandb.Artifact(f"traces-{manifest['fingerprint']}", type="dataset",
                              metadata={k: manifest.get(k) for k in keys})
    artifact.add_file(str(directory / MANIFEST))
    for shard in manifest["shards"]:
        artifact.add_reference((directory / shard["file"]).as_uri(), name=shard["file"], checksum=False)
    return artifact


def head_artifact(directory: str | Path):
    """A head directory (config.json, model.safetensors, metrics.json) as a ``model`` artifact named
    ``deferral-head-<fingerprint>``: train-deferral logs it, evaluate and compare use the same version."""
    import wandb

    from .deferral.heads import fingerprint

    directory = Path(directory)
    config = read_json(directory / "config.json")
    artifact = wandb.Artifact(f"deferral-head-{fingerprint(directory)}", type="model",
                              metadata={**config.get("metrics", {}), "provenance": config.get("provenance", {})})
    for name in ("config.json", "model.safetensors", "metrics.json"):
        if (directory / name).is_file():
            artifact.add_file(str(directory / name))
    return artifact


def use_artifact(run, artifact) -> None:
    """Declare ``artifact`` an input of ``run``. Online this is ``run.use_artifact``; offline W&B refuses
    ``use_artifact``, so the artifact is recorded the way ``use_artifact`` records a new artifact
    (logged, then used once committed), which ``wandb sync`` turns into the same lineage."""
    if run.offline:
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)


def run_path(run) -> str:
    """Where an offline run's files are (for `wandb sync`), or its URL when online."""
    return str(Path(run.dir).parent) if run.offline else run.url
