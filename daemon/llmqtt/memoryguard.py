"""The service's watch on free memory while serving (service.MemoryPressure): smaller batches and no new
generations while it is low. The threshold comes from the plan (`Plan.low_memory_bytes`)."""

from __future__ import annotations

import threading
from typing import Callable, Literal


class MemoryGuard:
    """Watches available memory while serving: halves batches and refuses new generations when it is low.

    `read_available` returns bytes available (RAM capped by cgroup headroom), or None when unreadable,
    which counts as ok. Leaving the low state needs 25 % more than the threshold, so a reading that
    hovers around the threshold does not flip the state on every request.
    """

    RECOVER_FACTOR = 1.25

    def __init__(self, threshold_bytes: int, read_available: Callable[[], int | None]) -> None:
        self.threshold_bytes = threshold_bytes
        self._read_available = read_available
        self._low = False
        self._lock = threading.Lock()

    def state(self) -> Literal["ok", "low"]:
        available = self._read_available()
        with self._lock:
            if available is None:
                self._low = False
            elif self._low:
                self._low = available < self.threshold_bytes * self.RECOVER_FACTOR
            else:
                self._low = available < self.threshold_bytes
            return "low" if self._low else "ok"

    def batch_limit(self, max_batch: int) -> int:
        return max(1, max_batch // 2) if self.state() == "low" else max_batch

    def allow_generation(self) -> bool:
        # Generation grows a KV cache token by token; a classification is one short forward pass.
        return self.state() == "ok"
