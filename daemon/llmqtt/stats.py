"""Per-task counters and latency percentiles for the health topic. Pure; no paho, no torch."""

from __future__ import annotations

import threading
from collections import deque

from .jobs import Outcome


class ServiceStats:
    """Counters and recent latencies for the health topic; cheap to update from the worker thread."""

    _SAMPLES = 256
    _WORK_SAMPLES = 32  # units of work behind the drain rate: recent enough to follow load, enough to be steady
    _UNMEASURED_S = 0.5  # per job, before the first unit of that kind has run

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ok: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._error_codes: dict[str, int] = {}
        self._latency: dict[str, deque[float]] = {}
        self._tokens_per_s: deque[float] = deque(maxlen=32)
        # (jobs, seconds) of the worker's last units of work per kind ("classify": batches, "generate"):
        # the measured drain rate behind `busy`'s retry hint.
        self._work: dict[str, deque[tuple[int, float]]] = {}

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            if outcome.ok:
                self._ok[outcome.task] = self._ok.get(outcome.task, 0) + 1
                self._latency.setdefault(outcome.task, deque(maxlen=self._SAMPLES)).append(outcome.latency_ms)
            else:
                self._errors[outcome.task] = self._errors.get(outcome.task, 0) + 1
                code = outcome.code
                self._error_codes[code] = self._error_codes.get(code, 0) + 1

    def record_tokens_per_s(self, value: float) -> None:
        if value > 0:
            with self._lock:
                self._tokens_per_s.append(value)

    def record_work(self, kind: str, jobs: int, seconds: float) -> None:
        """One unit of the worker's work: a classification batch of `jobs`, or one generation."""
        if jobs > 0:
            with self._lock:
                self._work.setdefault(kind, deque(maxlen=self._WORK_SAMPLES)).append((jobs, seconds))

    def retry_after_ms(self, waiting: dict[str, int]) -> int:
        """A hint for a refused client: how long the queue (`waiting` jobs per kind) takes to drain at the
        rate the worker measured over its last units of work; the seconds per job of a kind are total time
        over total jobs, so batching counts. A kind not measured yet counts `_UNMEASURED_S` per job."""
        with self._lock:
            drain_s = 0.0
            for kind, count in waiting.items():
                work = self._work.get(kind)
                per_job = sum(s for _, s in work) / sum(n for n, _ in work) if work else self._UNMEASURED_S
                drain_s += count * per_job
        return int(min(60_000, max(100, drain_s * 1000)))

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
