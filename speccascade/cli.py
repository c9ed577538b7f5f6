"""The ``speccascade`` command: one subcommand per pipeline step, each taking ``--config FILE.yaml``.

Bad input ends with a one-line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import inspect
import sys
from typing import Callable

from jsonargparse import ActionConfigFile, ArgumentParser

from .bench import bench
from .data.log_traces import log_traces
from .errors import SpeccascadeError
from .evaluation.compare import compare
from .evaluation.demo import demo
from .evaluation.evaluate import evaluate
from .evaluation.operating_point import operating_point
from .finetune import finetune
from .training.train import train_deferral

COMMANDS: dict[str, Callable] = {"log-traces": log_traces, "train-deferral": train_deferral, "evaluate": evaluate,
                                  "compare": compare, "operating-point": operating_point, "demo": demo,
                                  "bench": bench, "finetune": finetune}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="speccascade", description="Speculative cascades with learned deferral rules.")
    subcommands = parser.add_subcommands(dest="command")
    for name, function in COMMANDS.items():
        sub = ArgumentParser(description=(function.__doc__ or "").strip().splitlines()[0])
        sub.add_argument("--config", action=ActionConfigFile, help="YAML file of options; flags override it")
        sub.add_function_arguments(function)
        subcommands.add_subcommand(name, sub, help=sub.description)
    return parser


def _underscored(arg: str) -> str:
    """``--max-new-tokens=5`` -> ``--max_new_tokens=5``: both spellings are accepted."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("-", "_").replace("__", "--", 1) + eq + value


def _normalised(argv: list[str]) -> list[str]:
    """Dashes or underscores in option names; a bare boolean flag (``--resume``) means true."""
    args = [_underscored(a) for a in argv]
    function = COMMANDS.get(args[0]) if args else None
    flags = {f"--{n}" for n, p in inspect.signature(function).parameters.items() if p.annotation in (bool, "bool")} if function else set()
    return [f"{a}=true" if a in flags and (i + 1 == len(args) or args[i + 1].startswith("--")) else a
            for i, a in enumerate(args)]


def train_deferral_main(argv: list[str] | None = None) -> int:
    """The ``train-deferral`` console script: ``speccascade train-deferral`` under its own name."""
    return main(["train-deferral", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    cfg = parser.parse_args(_normalised(sys.argv[1:] if argv is None else argv))
    options = {k: v for k, v in cfg[cfg.command].as_dict().items() if k != "config"}
    try:
        COMMANDS[cfg.command](**options)
    except SpeccascadeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
