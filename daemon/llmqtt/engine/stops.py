"""Stop strings (Ollama's `options.stop`, OpenAI's `stop`): the answer ends before the first one.

A wrapper around a generation, so the decode loop stays as it is: text that could be the start of a stop
string is held back until it is clearly not one; when a stop string appears, the generation's cancel flag
is set (it ends at its next token) and the answer is cut before the stop string, finishing with `stop`.
"""

from __future__ import annotations

import threading
from typing import Iterator, Protocol, Sequence

from .types import GenerationResult


class _Stream(Protocol):
    result: GenerationResult

    def __iter__(self) -> Iterator[str]: ...


class StopStrings:
    def __init__(self, generation: _Stream, stops: Sequence[str], cancel: threading.Event):
        self._generation, self._cancel = generation, cancel
        self._stops = [s for s in stops if s]
        self.result = generation.result

    def __iter__(self) -> Iterator[str]:
        hold = max((len(s) for s in self._stops), default=1) - 1  # a stop string's start may be in the tail
        text, sent, cut = "", 0, None
        pieces = iter(self._generation)
        for piece in pieces:
            text += piece
            cut = first_stop(text, self._stops, max(0, sent - hold))
            end = cut if cut is not None else max(sent, len(text) - hold)
            if end > sent:
                yield text[sent:end]
                sent = end
            if cut is not None:
                self._cancel.set()
                for _ in pieces:  # let the loop end at its next token, so its result is complete
                    pass
                break
        if cut is None:
            if len(text) > sent:
                yield text[sent:]
            return
        self.result.text = text[:cut]
        self.result.finish_reason = "stop"


def first_stop(text: str, stops: Sequence[str], search_from: int = 0) -> int | None:
    """Where the earliest stop string starts in `text` (looking from `search_from`), or None."""
    found = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
    return min(found) if found else None
