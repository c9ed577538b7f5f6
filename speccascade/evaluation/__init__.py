"""Rule comparison on real decoding: evaluate, Pareto fronts and summaries, the operating-point picker, the demo."""

from .evaluate import evaluate
from .operating_point import operating_point
from .summary import pareto_front, summary

__all__ = ["evaluate", "operating_point", "pareto_front", "summary"]
