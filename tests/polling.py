"""Bounded waiting for a condition in tests: poll, never sleep a fixed time."""

from __future__ import annotations

import threading
from typing import Callable


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    pause = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        pause.wait(0.01)
    raise AssertionError("condition not met in time")
