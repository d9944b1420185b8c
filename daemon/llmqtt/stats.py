"""Per-task counters and latency percentiles for the health topic. Pure; no paho, no torch."""

from __future__ import annotations

import threading
from collections import deque

from .jobs import Outcome


class ServiceStats:
    """Counters and recent latencies for the health topic; cheap to update from the worker thread."""

    _SAMPLES = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ok: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._error_codes: dict[str, int] = {}
        self._latency: dict[str, deque[float]] = {}
        self._tokens_per_s: deque[float] = deque(maxlen=32)
        self._job_ms = 500.0  # running mean of one job's run time, seeds the `busy` retry hint

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            if outcome.ok:
                self._ok[outcome.task] = self._ok.get(outcome.task, 0) + 1
                self._latency.setdefault(outcome.task, deque(maxlen=self._SAMPLES)).append(outcome.latency_ms)
                run_ms = max(0.0, outcome.latency_ms - outcome.queue_ms)
                if not outcome.cached:
                    self._job_ms = 0.8 * self._job_ms + 0.2 * run_ms
            else:
                self._errors[outcome.task] = self._errors.get(outcome.task, 0) + 1
                code = outcome.code
                self._error_codes[code] = self._error_codes.get(code, 0) + 1

    def record_tokens_per_s(self, value: float) -> None:
        if value > 0:
            with self._lock:
                self._tokens_per_s.append(value)

    def retry_after_ms(self, depth: int) -> int:
        """A hint for a refused client: roughly how long the queue ahead of it takes to drain."""
        with self._lock:
            return int(min(60_000, max(100, (depth + 1) * self._job_ms)))

    def snapshot(self) -> dict:
        with self._lock:
            tasks = sorted({*self._ok, *self._errors})
            per_task = {task: {"ok": self._ok.get(task, 0), "error": self._errors.get(task, 0),
                               **_percentiles(self._latency.get(task, ()))} for task in tasks}
            tps = sum(self._tokens_per_s) / len(self._tokens_per_s) if self._tokens_per_s else None
            return {"ok": sum(self._ok.values()), "error": sum(self._errors.values()),
                    "errors_by_code": dict(self._error_codes), "tasks": per_task,
                    "tokens_per_s": round(tps, 2) if tps is not None else None}


def percentile(samples, q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty collection: always one of the samples."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def _percentiles(samples) -> dict:
    if not samples:
        return {"p50_ms": None, "p95_ms": None}
    return {"p50_ms": percentile(samples, 0.50), "p95_ms": percentile(samples, 0.95)}
