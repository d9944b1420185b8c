"""Per-session chat history: a bounded, idle-expiring map of (task, session id) -> turns.

Pure and small: no torch, no MQTT. The store bounds memory (number of sessions, turns per session);
the engine trims what it is given to the task's token budget, so the store need not count tokens.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from .engine.types import Turn

SessionKey = tuple[str, str]  # (task, session id): the same id on two tasks is two conversations


@dataclass
class _Session:
    turns: list[Turn] = field(default_factory=list)
    last_used: float = 0.0


class SessionStore:
    """Least-recently-used sessions, at most `max_sessions`, each forgotten after `idle_ttl_s` unused."""

    def __init__(self, max_sessions: int, idle_ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._max = max_sessions
        self._ttl = idle_ttl_s
        self._clock = clock
        self._sessions: OrderedDict[SessionKey, _Session] = OrderedDict()
        self._lock = threading.Lock()  # health reads the size from another thread

    def history(self, task: str, session: str) -> list[Turn]:
        """The kept turns, oldest first; empty for a new or expired session."""
        with self._lock:
            self._expire()
            entry = self._sessions.get((task, session))
            return list(entry.turns) if entry else []

    def append(self, task: str, session: str, user: str, assistant: str, max_turns: int) -> None:
        """Record one exchange; keep at most `max_turns` user+assistant pairs (0 keeps none)."""
        with self._lock:
            self._expire()
            key = (task, session)
            entry = self._sessions.pop(key, None) or _Session()
            entry.turns.extend((Turn("user", user), Turn("assistant", assistant)))
            del entry.turns[: max(0, len(entry.turns) - 2 * max_turns)]
            entry.last_used = self._clock()
            self._sessions[key] = entry  # re-insert: most recently used goes last
            while len(self._sessions) > self._max:
                self._sessions.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._sessions)

    def _expire(self) -> None:
        # Oldest-used first, so stop at the first one still fresh.
        cutoff = self._clock() - self._ttl
        while self._sessions:
            key, entry = next(iter(self._sessions.items()))
            if entry.last_used > cutoff:
                break
            del self._sessions[key]
