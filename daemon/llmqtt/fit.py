"""`llmqtt fit TASK DATA.jsonl`: teach a classify task from labelled examples.

Each text runs once through the model behind the task's cached prompt prefix (as a request would); the
hidden states of a few candidate layers are kept, and a linear head is fitted on them (engine/head.py):
features and regularisation chosen by cross-validation, temperature fitted on the held-out folds. The head
is written next to the task file, and the daemon serves the task with it from the next start.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .tasks import ClassifyTask

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


def candidate_layers(num_layers: int) -> list[int]:
    """Decoder layers whose states are collected: the middle to three quarters of the depth, where small
    models keep what a text is about and how it feels; the pass stops after the deepest (18 of 24 for the
    demo model: a quarter of the forward saved, when fitting and when serving)."""
    fractions = (0.5, 0.625, 0.75)
    return sorted({max(1, round(num_layers * f)) for f in fractions})


def candidates(layers: Sequence[int]):
    """Feature sets tried by cross-validation: each layer's cue and mean-pooled states together, and the
    middle layers concatenated."""
    from .engine.head import Features

    sets = [Features(((layer, "cue"), (layer, "mean"))) for layer in layers]
    if len(layers) >= 3:
        middle = layers[: len(layers) // 2 + 1]
        sets.append(Features(tuple((layer, pool) for layer in middle for pool in ("cue", "mean"))))
    return sets


def collect(scorer, rows: Sequence[LabelledText], layers: Sequence[int], max_batch: int,
            tick: Callable[[int], None]) -> tuple[dict, list[int], list[tuple[LabelledText, str]]]:
    """Pooled states per (layer, pool) for the rows the task can serve, [N, H] each; their indices; and the
    rows skipped (too long for the context, or carrying chat-control tokens) with the reason."""
    import torch

    from .engine.classify import length_chunks
    from .engine.head import Features
    from .engine.types import EngineError

    every = Features(tuple((layer, pool) for layer in layers for pool in ("cue", "mean")))
    ids, kept, skipped = [], [], []
    for i, row in enumerate(rows):
        try:
            ids.append(scorer.rest_ids(row.text))
            kept.append(i)
        except EngineError as exc:
            skipped.append((row, str(exc)))
    if skipped:
        tick(len(skipped))
    parts: dict = {part: [None] * len(ids) for part in every.parts}
    for chunk in length_chunks([len(r) for r in ids], max_batch):
        states = scorer.layer_states([ids[i] for i in chunk], every)
        for part, values in states.items():
            for j, i in enumerate(chunk):
                parts[part][i] = values[j]
        tick(len(chunk))
    return {part: torch.stack(values) for part, values in parts.items()}, kept, skipped


def fit(engine, task_name: str, rows: Sequence[LabelledText], model_info: dict,
        tick: Callable[[int], None] = lambda n: None, say: Callable[[str], None] = lambda s: None,
        collected: Callable[[], None] = lambda: None):
    """Collect states for `rows` through the engine's scorer for `task_name` and fit a head (FitResult)."""
    import torch

    from .engine.head import fit_head

    scorer = engine._scorers[task_name]
    task: ClassifyTask = engine.tasks[task_name]
    labels = list(task.labels)
    layers = candidate_layers(engine.loaded.model.config.num_hidden_layers)
    started = time.perf_counter()
    states, kept, skipped = collect(scorer, rows, layers, engine.max_batch, tick)
    seconds = time.perf_counter() - started
    collected()
    for row, reason in skipped[:5]:
        say(f"skipped line {row.line}: {reason}")
    if len(skipped) > 5:
        say(f"... {len(skipped) - 5} more rows skipped")
    y = torch.tensor([labels.index(rows[i].label) for i in kept])
    say(f"{len(kept)} rows through the model in {seconds:.0f} s ({len(kept) / seconds:.1f} rows/s); "
        f"choosing features and regularisation by cross-validation")
    meta = {**model_info, "task": task_name, "prompt": scorer.prompt_fingerprint(),
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows_per_s": round(len(kept) / seconds, 2)}
    return fit_head(states, y, labels, candidates(layers), meta, on_step=say)


def held_out_accuracy(engine, task_name: str, head, rows: Sequence[LabelledText]) -> dict[str, float]:
    """Accuracy on rows the head never saw: the task's prompt alone, and with `head`. A row the task cannot
    serve (too long) counts as wrong."""
    from .engine.types import EngineError

    scorer = engine._scorers[task_name]
    before, scorer.head = scorer.head, head
    right = {"prompt": 0, "head": 0}
    try:
        for row in rows:
            for read_out in right:
                try:
                    label = engine.classify(task_name, [row.text], use_head=read_out == "head")[0].label
                except EngineError:
                    continue
                right[read_out] += label == row.label
    finally:
        scorer.head = before
    return {read_out: n / len(rows) for read_out, n in right.items()}
