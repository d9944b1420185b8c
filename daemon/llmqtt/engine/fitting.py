"""The model's side of `llmqtt fit`: run labelled texts through a task's cached prefix, keep the hidden
states of a few candidate layers, and fit a head on them (engine/head.py). Reading and checking the data
file is fit.py's job; this module sees plain texts and label names.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .classify import length_chunks
from .head import FitResult, Features, fit_head
from .types import EngineError


def candidate_layers(num_layers: int) -> list[int]:
    """Decoder layers whose states are collected: the middle to three quarters of the depth, where small
    models keep what a text is about and how it feels; the pass stops after the deepest (18 of 24 for the
    demo model: a quarter of the forward saved, when fitting and when serving)."""
    fractions = (0.5, 0.625, 0.75)
    return sorted({max(1, round(num_layers * f)) for f in fractions})


def candidates(layers: Sequence[int]) -> list[Features]:
    """Feature sets tried by cross-validation: each layer's cue and mean-pooled states together, and the
    middle layers concatenated."""
    sets = [Features(((layer, "cue"), (layer, "mean"))) for layer in layers]
    if len(layers) >= 3:
        middle = layers[: len(layers) // 2 + 1]
        sets.append(Features(tuple((layer, pool) for layer in middle for pool in ("cue", "mean"))))
    return sets


def collect(scorer, texts: Sequence[str], layers: Sequence[int], max_batch: int,
            tick: Callable[[int], None]) -> tuple[dict, list[int], list[tuple[int, str]]]:
    """Pooled states per (layer, pool) for the texts the task can serve, [N, H] each; their indices; and the
    texts skipped (too long for the context, or carrying chat-control tokens) as (index, reason)."""
    every = Features(tuple((layer, pool) for layer in layers for pool in ("cue", "mean")))
    ids, kept, skipped = [], [], []
    for i, text in enumerate(texts):
        try:
            ids.append(scorer.rest_ids(text))
            kept.append(i)
        except EngineError as exc:
            skipped.append((i, str(exc)))
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


def fit_task_head(engine, task_name: str, texts: Sequence[str], labels: Sequence[str], model_info: dict, *,
                  tick: Callable[[int], None] = lambda n: None, say: Callable[[str], None] = lambda s: None,
                  collected: Callable[[], None] = lambda: None,
                  skipped: Callable[[list[int], list[str]], None] = lambda i, r: None) -> FitResult:
    """Collect states for `texts` through the engine's scorer for `task_name` and fit a head on `labels`
    (one of the task's label names per text)."""
    scorer = engine._scorer(task_name)
    names = list(engine.tasks[task_name].labels)
    layers = candidate_layers(engine.loaded.model.config.num_hidden_layers)
    started = time.perf_counter()
    states, kept, dropped = collect(scorer, texts, layers, engine.max_batch, tick)
    seconds = time.perf_counter() - started
    collected()
    if dropped:
        skipped([i for i, _ in dropped], [reason for _, reason in dropped])
    y = torch.tensor([names.index(labels[i]) for i in kept])
    say(f"{len(kept)} rows through the model in {seconds:.0f} s ({len(kept) / seconds:.1f} rows/s); "
        f"choosing features and regularisation by cross-validation")
    meta = {**model_info, "task": task_name, "prompt": scorer.prompt_fingerprint(),
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows_per_s": round(len(kept) / seconds, 2)}
    return fit_head(states, y, names, candidates(layers), meta, on_step=say)


def held_out_accuracy(engine, task_name: str, head, texts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy on texts the head never saw: the task's prompt alone, and with `head`. A text the task cannot
    serve (too long) counts as wrong."""
    scorer = engine._scorer(task_name)
    before, scorer.head = scorer.head, head
    right = {"prompt": 0, "head": 0}
    try:
        for text, label in zip(texts, labels):
            for read_out in right:
                try:
                    answer = engine.classify(task_name, [text], use_head=read_out == "head")[0].label
                except EngineError:
                    continue
                right[read_out] += answer == label
    finally:
        scorer.head = before
    return {read_out: n / len(texts) for read_out, n in right.items()}
