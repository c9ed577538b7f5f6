"""Command modules stay readable: no function's code (its body, the docstring aside) reaches 50 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import speccascade

COMMAND_MODULES = ("cli.py", "tracing/log_traces.py", "training/train.py", "evaluation/evaluate.py", "evaluation/compare.py",
                   "demo.py", "evaluation/report.py", "evaluation/operating_point.py", "finetune/train.py",
                   "bench/command.py", "report.py", "tracking.py")
LIMIT = 50


def code_lines(function: ast.FunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = function.body[1:] if ast.get_docstring(function) is not None and len(function.body) > 1 else function.body
    return function.end_lineno - body[0].lineno + 1


def test_no_command_function_reaches_fifty_lines():
    root = Path(speccascade.__file__).parent
    lengths = {f"{name}:{node.name}": code_lines(node)
               for name in COMMAND_MODULES for node in ast.walk(ast.parse((root / name).read_text()))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert len(lengths) > 40 and lengths["evaluation/evaluate.py:run"] > 5  # the modules were read
    longest = max(lengths, key=lengths.get)
    assert lengths[longest] < LIMIT, f"{longest} has {lengths[longest]} lines of code"
