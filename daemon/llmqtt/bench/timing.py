"""Latency samples -> p50/p95/throughput, and a ratio that says plainly when it cannot be computed."""

from __future__ import annotations

import time
from typing import Callable, Iterable, TypeVar

from ..stats import percentile

T = TypeVar("T")


def latency_stats(seconds: list[float], wall_s: float | None = None) -> dict:
    """p50/p95/mean in ms; throughput = messages per second of wall time (sum of samples if not given)."""
    if not seconds:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None, "per_s": None}
    wall = wall_s if wall_s is not None else sum(seconds)
    return {"n": len(seconds), "p50_ms": 1000 * percentile(seconds, 0.5), "p95_ms": 1000 * percentile(seconds, 0.95),
            "mean_ms": 1000 * sum(seconds) / len(seconds), "per_s": len(seconds) / wall if wall > 0 else None}


def timed(fn: Callable[[T], object], items: Iterable[T], tick: Callable[[int], None] = lambda n: None
          ) -> tuple[list[float], list[object]]:
    """Call fn on each item one after the other: (seconds per call, results)."""
    seconds, results = [], []
    for item in items:
        start = time.perf_counter()
        results.append(fn(item))
        seconds.append(time.perf_counter() - start)
        tick(1)
    return seconds, results


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
