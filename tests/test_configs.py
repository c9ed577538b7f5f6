"""Every YAML config shipped in configs/ parses with its command (keys exist, types fit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from speccascade.cli import build_parser

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
COMMAND = {"traces": "log-traces", "train": "train-deferral", "eval": "evaluate", "bench": "bench", "configs": "demo",
           "finetune": "finetune"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    command = COMMAND[path.parent.name]
    cfg = build_parser().parse_args([command, "--config", str(path)])
    assert cfg[command]["out"] is not None
