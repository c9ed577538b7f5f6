"""The README's Python example works as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_example_runs(capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has a Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.sequences.shape[0] == 2 and out.stats.new_tokens == 2 * 32
    assert len(eval("pair.decode(out.new_tokens)", namespace)) == 2


def test_readme_encoder_decoder_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[0] + blocks[1], "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.sequences.shape == (1, 17) and out.sequences[0, 0] == namespace["t5"].decoder_start_token_id
