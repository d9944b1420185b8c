"""Accuracy of a classify task on labelled rows, with a confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..engine.types import EngineError
from .data import Row

CHUNK = 16  # rows handed to engine.classify at a time: the engine's batch size, and a tick of the bar


@dataclass
class Scored:
    """What a classifier said about labelled rows: predicted labels (None = unparseable) and their gold labels."""

    labels: list[str]  # the task's label names, in order
    gold: list[str] = field(default_factory=list)
    predicted: list[str | None] = field(default_factory=list)

    def summary(self) -> dict:
        n = len(self.gold)
        right = sum(p == g for p, g in zip(self.predicted, self.gold))
        return {"n": n, "accuracy": right / n if n else 0.0, "confusion": self.confusion(),
                "no_label": sum(p is None for p in self.predicted)}  # refused or unparseable: counted wrong

    def confusion(self) -> dict[str, dict[str, int]]:
        """gold label -> predicted label (or "none") -> count."""
        columns = [*self.labels, "none"]
        table = {g: {p: 0 for p in columns} for g in self.labels}
        for g, p in zip(self.gold, self.predicted):
            table[g][p if p is not None else "none"] += 1
        return table


def classify_rows(engine, task: str, rows: Sequence[Row], tick: Callable[[int], None] = lambda n: None,
                  use_head: bool = True) -> Scored:
    """The classification path (prefix cache + the task's head, or its label logits), batched like the
    daemon does; `use_head=False` reads the label logits even where the task has a head."""
    labels = list(engine.tasks[task].labels)
    scored = Scored(labels)
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        for row, result in zip(chunk, _classify_chunk(engine, task, chunk, use_head)):
            scored.gold.append(row.label)
            scored.predicted.append(result.label if result else None)
        tick(len(chunk))
    return scored


def _classify_chunk(engine, task: str, chunk: Sequence[Row], use_head: bool) -> list:
    """Results in order; a text the engine refuses (e.g. too long for the context) counts as no label,
    i.e. wrong, as the daemon would answer it with an error. Its batch-mates are retried one by one."""
    try:
        return engine.classify(task, [r.text for r in chunk], use_head)
    except EngineError:
        if len(chunk) == 1:
            return [None]
        return [result for row in chunk for result in _classify_chunk(engine, task, [row], use_head)]

