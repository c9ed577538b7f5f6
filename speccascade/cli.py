"""The ``speccascade`` command: one subcommand per pipeline step, each taking ``--config FILE.yaml``.

Options are spelled with dashes (``--block-size``); YAML keys with underscores (``block_size``).
Every failure ends with exactly one ``error: ...`` line on stderr: bad input (settings, files,
a busy or foreign output directory, a full disk) exits 2, an interrupt (Ctrl-C, SIGINT) 130 with
``error: interrupted``, and an unexpected exception 1, named, with its traceback behind
``-v/--verbose``. Third-party output is quiet unless ``-v`` (:mod:`speccascade.runtime`).

Interrupts, as a process (:func:`main` without arguments): this module imports nothing heavy, and :func:`main`
installs its SIGINT handler first. Until the command starts (the parser, torch and Lightning loading) nothing is
written, so an interrupt prints the line and ends the process at once; once it runs, an interrupt raises
``KeyboardInterrupt`` so that the command keeps or removes what it wrote. Either way SIGINT is ignored from the
first interrupt on, and once the exit code is known, so that a second one cannot cut the cleanup short or turn the
exit code into death by signal while the interpreter exits.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import re
import signal
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable

from . import runtime
from .errors import SpeccascadeError
from .version import __version__

VERBOSE_FLAGS = ("-v", "--verbose")
EXIT_BAD_INPUT, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 2, 1, 130
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser


@functools.cache
def commands() -> dict[str, tuple[Callable, type]]:
    """name -> (function, its settings class: the command's options, their help and their checks), imported on
    first use (``cli.COMMANDS`` is the same dict)."""
    from .bench.command import BenchSettings, bench
    from .demo import DemoSettings, demo
    from .evaluation.compare import CompareSettings, compare
    from .evaluation.evaluate import EvaluateSettings, evaluate
    from .evaluation.operating_point import OperatingPointSettings, operating_point
    from .finetune.train import FinetuneSettings, finetune
    from .tracing.log_traces import LogTracesSettings, log_traces
    from .training.train import TrainSettings, train_deferral

    return {
        "log-traces": (log_traces, LogTracesSettings), "train-deferral": (train_deferral, TrainSettings),
        "evaluate": (evaluate, EvaluateSettings), "compare": (compare, CompareSettings),
        "operating-point": (operating_point, OperatingPointSettings), "demo": (demo, DemoSettings),
        "bench": (bench, BenchSettings), "finetune": (finetune, FinetuneSettings),
    }


def __getattr__(name: str) -> Any:
    if name == "COMMANDS":
        return commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _add(parser: ArgumentParser, name: str, hint: Any, default: Any, help: str) -> None:
    """One option, spelled with dashes; a boolean is a switch (``--resume``, ``--no-resume``)."""
    from jsonargparse import ActionYesNo

    from .settings import flag

    kwargs: dict[str, Any] = {"dest": name, "help": help}
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    if hint is bool:
        parser.add_argument(flag(name), action=ActionYesNo(no_prefix="no-"), **kwargs)
    else:
        parser.add_argument(flag(name), type=hint, **kwargs)


def _options(settings: type) -> list[tuple[str, Any, Any, str]]:
    """``(name, type, default, help)`` of each field of a settings class."""
    from .settings import hints

    types = hints(settings)
    return [(f.name, types[f.name], f.default, f.metadata.get("help", "")) for f in dataclasses.fields(settings)]


def build_parser() -> ArgumentParser:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="speccascade", description="Speculative cascades with learned deferral rules.",
                            exit_on_error=False, print_config="--print-config", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"speccascade {__version__}")
    parser.add_argument(*VERBOSE_FLAGS, action="store_true", help="show third-party output and tracebacks (anywhere on the line)")
    subcommands = parser.add_subcommands(dest="command")
    for name, (function, settings) in commands().items():
        sub = ArgumentParser(description=(function.__doc__ or "").strip().splitlines()[0], exit_on_error=False,
                             print_config="--print-config", allow_abbrev=False)  # --limit is no --limit-per-category
        sub.add_argument("--config", action=ActionConfigFile, help="YAML file of options (keys with underscores); flags override it")
        for option in _options(settings):
            _add(sub, *option)
        subcommands.add_subcommand(name, sub, help=sub.description)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_error(err: Exception, command: str | None) -> str:
    """jsonargparse's message, on one line and in the command line's spelling; a refused value of a setting
    names what the setting accepts (:func:`~speccascade.settings.accepts`), union-typed ones' included."""
    from .settings import accepts, flag

    text = str(err)
    key = re.match(r'Parser key "([\w.]+)":\s*(.*)', text, flags=re.S)
    given = re.search(r"(?:Got|Given) value: (.*)$", text)
    if key and given and command:  # a value the setting's type refuses
        name = key.group(1).split(".")[-1]
        text = f"{flag(name)}: expected {accepts(commands()[command][1], name)}, got {given.group(1)}"
    elif key:  # --config: a file that is missing or no YAML
        text = f"{flag(key.group(1).split('.')[-1])}: {key.group(2).strip().splitlines()[0]}"
    if re.search(r"(arguments|accept option).*_", text):
        text += " (options are spelled with dashes, e.g. --block-size)"
    return _one_line(text).rstrip(".")


def train_deferral_main(argv: list[str] | None = None) -> int:
    """The ``train-deferral`` console script: ``speccascade train-deferral`` under its own name."""
    return main(["train-deferral", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv`` None: this process's, with its SIGINT handling; see the module docstring)."""
    if argv is not None:
        return _guarded(list(argv))
    signal.signal(signal.SIGINT, _stop_at_once)
    try:
        return _guarded(sys.argv[1:])
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()


def _guarded(args: list[str]) -> int:
    """:func:`_main`, with an interrupt while the commands load as ``error: interrupted`` too."""
    try:
        return _main(args)
    except KeyboardInterrupt:
        return _interrupted()


def _stop_at_once(signum: int, frame: Any) -> None:
    """SIGINT before the command runs: nothing is written yet, so print the line and end the process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, b"error: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def _raise_interrupt(signum: int, frame: Any) -> None:
    """SIGINT while the command runs: ``KeyboardInterrupt``, once (the command's cleanup must not be cut short)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _interrupted() -> int:
    print("error: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _main(args: list[str]) -> int:
    verbose = any(a in VERBOSE_FLAGS for a in args)
    args = [a for a in args if a not in VERBOSE_FLAGS]
    runtime.configure(verbose)
    command = next((a for a in args if a in commands()), None)
    try:
        cfg = build_parser().parse_args(args)
    except SystemExit as done:  # --help, --version
        return int(done.code or 0)
    except Exception as err:  # jsonargparse's ArgumentError and its kin
        where = f"speccascade {command} --help" if command else "speccascade --help"
        print(f"error: {_parse_error(err, command)}; see `{where}`", file=sys.stderr)
        return EXIT_BAD_INPUT
    if cfg.command is None:
        print("error: name a command; see `speccascade --help`", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = {k: v for k, v in cfg[cfg.command].as_dict().items() if k not in ("config", "verbose")}
    return run(cfg.command, options, verbose)


def run(command: str, options: dict, verbose: bool = False) -> int:
    """Run one command; turn every way it can end into an exit code and at most one ``error:`` line."""
    function = commands()[command][0]
    if signal.getsignal(signal.SIGINT) is _stop_at_once:  # the process's command line: the command starts now
        signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        function(**options)
    except SpeccascadeError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return _interrupted()
    except OSError as err:
        if err.errno not in DISK_FULL:
            return _unexpected(err, verbose)
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: {os.strerror(err.errno).lower()}{where}; free some space and run again (--resume keeps the work "
              "that was finished)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        return _unexpected(err, verbose)
    return 0


def _unexpected(err: Exception, verbose: bool) -> int:
    """An exception that is no bad input: named on one line, its traceback behind ``-v``."""
    if verbose:
        traceback.print_exc()
    hint = "" if verbose else " (run with -v for the traceback)"
    print(f"error: {type(err).__name__}: {_one_line(err) or 'no message'}{hint}", file=sys.stderr)
    return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
