"""Summaries of quality-cost points (algorithms.md section 7): Pareto fronts and the two numbers per rule."""

from __future__ import annotations

import math


def pareto_front(points: list[dict], quality: str = "quality", cost: str = "relative_latency") -> list[dict]:
    """Points no other point beats on both axes (higher quality, lower cost), by increasing cost."""
    ordered = sorted(points, key=lambda p: (p[cost], -p[quality]))
    front, best = [], -math.inf
    for p in ordered:
        if p[quality] > best:
            front.append(p)
            best = p[quality]
    return front


def summary(points: list[dict], target_quality: float, target_latency: float = 1.0,
            quality: str = "quality", cost: str = "relative_latency") -> dict:
    """The lowest cost that matches the target's quality, and the best quality within the target's cost
    (None where no point qualifies). A point matches by its ``reaches_target`` decision where it has one
    (``evaluate``: paired non-inferiority and no guard), else when its quality is at least the target's."""
    matching = [p[cost] for p in points if p.get("reaches_target", p[quality] >= target_quality - 1e-9)]
    within = [p[quality] for p in points if p[cost] <= target_latency + 1e-9]
    return {
        "lowest_latency_at_target_quality": min(matching) if matching else None,
        "best_quality_within_target_latency": max(within) if within else None,
    }
