"""Reading a trace directory loads no model stack: neither torch nor the decoder nor Lightning. Run in a fresh
interpreter, so that nothing this test session imported counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.training.test_train import planted_traces

ROOT = Path(__file__).parents[2]
HEAVY = ("torch", "speccascade.decoding", "lightning", "pytorch_lightning", "lightning_fabric")
READ = """
import json, sys
from speccascade.data import load_traces, read_manifest
directory, heavy = sys.argv[1], sys.argv[2:]
manifest = read_manifest(directory)
rows = load_traces(directory).with_format("numpy")[:]
print(json.dumps({"rows": len(rows["gap"]), "complete": manifest["complete"], "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_reading_traces_imports_neither_torch_nor_the_decoder_nor_lightning(tmp_path):
    directory = planted_traces(tmp_path / "traces", examples=4, rows=3)
    done = subprocess.run([sys.executable, "-c", READ, str(directory), *HEAVY], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout.strip().splitlines()[-1])
    assert read["rows"] == 12 and read["complete"] is True
    assert read["loaded"] == []
