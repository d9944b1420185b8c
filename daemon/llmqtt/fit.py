"""`llmqtt fit TASK DATA.jsonl`: teach a classify task from labelled examples.

Each text runs once through the model behind the task's cached prompt prefix (as a request would); the
hidden states of a few candidate layers are kept, and a linear head is fitted on them (engine/head.py):
features and regularisation chosen by cross-validation, temperature fitted on the held-out folds. The head
is written next to the task file, and the daemon serves the task with it from the next start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


MIN_ROWS_PER_LABEL = 5  # below this, cross-validation says nothing (and the head would memorise)


class FitDataError(ValueError):
    """A data file `llmqtt fit` cannot use; `code` is stable, the message names the file and line."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    line: int


def read_rows(path: Path, labels: Sequence[str], min_per_label: int = MIN_ROWS_PER_LABEL) -> list[LabelledText]:
    """Rows `{"text": ..., "label": ...}`, one JSON object a line; blank lines are skipped, extra keys kept
    out. Raises FitDataError on the first line that is not such a row."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise FitDataError("unreadable", f"{path}: {exc}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FitDataError("malformed_line", f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise FitDataError("malformed_line", f'{where}: expected {{"text": "...", "label": "..."}}')
        if not row["text"].strip():
            raise FitDataError("malformed_line", f"{where}: empty text")
        if row["label"] not in labels:
            raise FitDataError("unknown_label", f"{where}: label {row['label']!r} is not one of the task's labels "
                                                f"{list(labels)}")
        rows.append(LabelledText(row["text"], row["label"], number))
    if not rows:
        raise FitDataError("empty", f"{path}: no rows")
    counts = {label: sum(r.label == label for r in rows) for label in labels}
    few = {label: n for label, n in counts.items() if n < min_per_label}
    if few:
        raise FitDataError("too_few_rows", f"{path}: every label needs at least {min_per_label} rows; "
                                           + ", ".join(f"{label!r} has {n}" for label, n in few.items()))
    return rows


def fit(engine, task_name: str, rows: Sequence[LabelledText], model_info: dict,
        tick: Callable[[int], None] = lambda n: None, say: Callable[[str], None] = lambda s: None,
        collected: Callable[[], None] = lambda: None):
    """Fit a head for `task_name` on `rows` (engine/fitting.py does the model work); says which rows the
    task could not serve, by line."""
    from .engine.fitting import fit_task_head

    def skipped(indices: Sequence[int], reasons: Sequence[str]) -> None:
        for i, reason in list(zip(indices, reasons))[:5]:
            say(f"skipped line {rows[i].line}: {reason}")
        if len(indices) > 5:
            say(f"... {len(indices) - 5} more rows skipped")

    return fit_task_head(engine, task_name, [r.text for r in rows], [r.label for r in rows], model_info,
                         tick=tick, say=say, collected=collected, skipped=skipped)


def held_out_accuracy(engine, task_name: str, head, rows: Sequence[LabelledText]) -> dict[str, float]:
    """Accuracy on rows the head never saw: the task's prompt alone, and with `head` (engine/fitting.py)."""
    from .engine.fitting import held_out_accuracy as measure

    return measure(engine, task_name, head, [r.text for r in rows], [r.label for r in rows])
