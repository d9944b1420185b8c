"""Stop strings (Ollama's `options.stop`, OpenAI's `stop`): the answer ends before the first one.

A filter the generation passes its text pieces through: text that could be the start of a stop string is
held back until it is clearly not one; when a stop string appears, the text before it is let out and the
generation ends (`stop`).
"""

from __future__ import annotations

from typing import Sequence


class StopFilter:
    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1  # a stop string's start may be in the tail
        self.text = ""  # everything fed so far
        self._sent = 0
        self.cut: int | None = None  # where the first stop string starts in `text`, once one appeared

    def feed(self, piece: str) -> str:
        """The part of the text so far that is safe to send now."""
        if self.cut is not None:
            return ""
        self.text += piece
        self.cut = first_stop(self.text, self._stops, max(0, self._sent - self._hold))
        end = self.cut if self.cut is not None else max(self._sent, len(self.text) - self._hold)
        return self._send(end)

    def flush(self) -> str:
        """At the end of the answer: whatever was held back (nothing after a stop string)."""
        return self._send(self.cut if self.cut is not None else len(self.text))

    def _send(self, end: int) -> str:
        if end <= self._sent:
            return ""
        out, self._sent = self.text[self._sent:end], end
        return out


def first_stop(text: str, stops: Sequence[str], search_from: int = 0) -> int | None:
    """Where the earliest stop string starts in `text` (looking from `search_from`), or None."""
    found = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
    return min(found) if found else None
