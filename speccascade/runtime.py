"""Quiet by default: the commands print their own progress, tables and paths, and nothing else.

:func:`configure` is called once by the command line. Quiet, it lowers the third-party libraries'
own verbosity settings (Lightning's info messages such as its "Tip: ... litlogger" banner and
"GPU available" lines, transformers' and datasets' logging and progress bars, W&B's console
output through :func:`speccascade.tracking.start_run`) and ignores the few warnings listed in
:data:`HARMLESS_WARNINGS`, each matched by category and message. ``-v/--verbose`` leaves every
library at its own defaults and shows everything. Python callers get the libraries' defaults
unless they call :func:`configure` themselves.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE = True  # the libraries' own defaults until configure() says otherwise

# (category, message pattern, why it is harmless)
HARMLESS_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "pytorch_lightning's own pytree helper on torch >= 2.10; nothing of ours uses LeafSpec"),
    (UserWarning, r"The '\w+_dataloader' does not have many workers",
     "trace rows are memory-mapped slices: worker processes would only copy them"),
    (UserWarning, r"Checkpoint directory .* exists and is not empty",
     "train-deferral --resume: the directory holds the run's own last.ckpt, which it continues and overwrites"),
)
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")


def configure(verbose: bool) -> None:
    """Quiet (the default of the command line) or verbose third-party output, for this process."""
    global VERBOSE
    VERBOSE = verbose
    if verbose:
        return
    import datasets
    import lightning_fabric  # noqa: F401  (each sets its logger's level when imported: import first)
    import pytorch_lightning  # noqa: F401
    import transformers

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category, message, _ in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def quiet() -> bool:
    return not VERBOSE
