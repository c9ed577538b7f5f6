"""W&B settings shared by every command: offline first, so nothing ever waits on the network."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from .errors import SpeccascadeError

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


def start_run(out: Path, project: str, mode: str, job_type: str, config: dict):
    """A W&B run saved under ``out/wandb``, with the speccascade version in its config; quiet unless
    the command line runs verbose (:mod:`speccascade.runtime`)."""
    import wandb

    from . import __version__, runtime

    settings = wandb.Settings(silent=runtime.quiet(), console="off" if runtime.quiet() else "auto")
    return wandb.init(project=project, mode=mode, dir=str(out), job_type=job_type,
                      config={**config, "speccascade_version": __version__}, settings=settings)


def run_path(run) -> str:
    """Where an offline run's files are (for `wandb sync`), or its URL when online."""
    return str(Path(run.dir).parent) if run.offline else run.url
