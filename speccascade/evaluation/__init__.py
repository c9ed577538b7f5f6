"""Rule comparison: on real decoding (evaluate, Pareto fronts and summaries), offline on held-out traces with
bootstrap intervals (compare), the operating-point picker."""

from .compare import compare
from .evaluate import evaluate
from .operating_point import operating_point
from .summary import pareto_front, summary

__all__ = ["compare", "evaluate", "operating_point", "pareto_front", "summary"]
