"""The extension lifecycle, and starting/stopping a set of them each inside its own error guard."""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

log = logging.getLogger(__name__)


class Extension(Protocol):
    """Constructor only stores dependencies; `start()` subscribes / starts timers; `stop()` undoes it."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


def start_all(extensions: Sequence[Extension]) -> list[Extension]:
    """Start each; one that fails is logged and left out, so it cannot take the others down."""
    started = []
    for ext in extensions:
        try:
            ext.start()
        except Exception:
            log.exception("extension %s failed to start; continuing without it", ext.name)
            continue
        started.append(ext)
    return started


def stop_all(extensions: Sequence[Extension]) -> None:
    """Stop in reverse start order, each guarded."""
    for ext in reversed(extensions):
        try:
            ext.stop()
        except Exception:
            log.exception("extension %s failed to stop cleanly", ext.name)
