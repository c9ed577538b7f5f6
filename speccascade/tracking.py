"""W&B settings shared by every command: offline first, so nothing ever waits on the network."""

from __future__ import annotations

import netrc
import os

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
        raise SpeccascadeError(f"wandb_mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    return mode
