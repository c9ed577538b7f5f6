"""Rule comparison: run decoders side by side, tabulate and report."""

from .compare import RunResult, decoders_for, run_all, stats_table

__all__ = ["RunResult", "decoders_for", "run_all", "stats_table"]
