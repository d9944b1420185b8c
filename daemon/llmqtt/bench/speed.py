"""Sentiment speed: (a) the seeds' way, (b) llmqtt's path one message at a time, (c) a burst via the queue.

(a) and (b) run on the same rows, so their accuracies compare too. (c) goes through `service.Service`
exactly as MQTT requests do: 64 jobs submitted at once, batched by the worker thread.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from ..engine.classify import length_chunks
from ..engine.prompt import encode
from ..engine.types import EngineError
from ..jobs import Job, Outcome
from ..service import Service
from ..sessions import SessionStore
from .accuracy import Scored
from .data import Row
from .seeds import SeedsWay
from .timing import latency_stats, ratio, timed

Tick = Callable[[int], None]


def sentiment_speed(engine, task: str, rows: Sequence[Row], burst_texts: Sequence[str], tick: Tick) -> dict:
    labels = list(engine.tasks[task].labels)
    seeds = SeedsWay(engine.loaded.model, engine.loaded.tokenizer, engine.tasks[task])
    a_s, a_out = timed(lambda r: seeds.classify(r.text)[0], rows, tick)
    b_s, b_out = timed(lambda r: _label_or_none(engine, task, r.text), rows, tick)
    a = {**latency_stats(a_s), **_accuracy(labels, rows, a_out), "samples_ms": _ms(a_s)}
    b = {**latency_stats(b_s), **_accuracy(labels, rows, b_out), "samples_ms": _ms(b_s)}
    c = burst(engine, task, burst_texts)
    tick(len(burst_texts))
    return {"seeds_way": a, "classify_one": b, "burst": c,
            "b_over_a": ratio(b["per_s"], a["per_s"]), "c_over_a": ratio(c["per_s"], a["per_s"]),
            "p50_a_over_b": ratio(a["p50_ms"], b["p50_ms"])}


def classify_one_speed(engine, task: str, rows: Sequence[Row], tick: Tick) -> dict:
    """Only (b): llmqtt's path one message at a time (`llmqtt bench --only`: the baseline it compares to)."""
    labels = list(engine.tasks[task].labels)
    b_s, b_out = timed(lambda r: _label_or_none(engine, task, r.text), rows, tick)
    return {"classify_one": {**latency_stats(b_s), **_accuracy(labels, rows, b_out), "samples_ms": _ms(b_s)}}


def head_vs_prompt_latency(engine, task: str, rows: Sequence[Row], reps: int = 3) -> dict:
    """Per-message latency with the task's learned head vs its prompt's label logits, one message at a time.

    Interleaved per message (head first on even rows, prompt first on odd ones) so machine load drifts
    into both alike; `reps` passes over the rows, medians per pass and over all.
    """
    samples: dict[str, list[float]] = {"head": [], "prompt": []}
    per_rep = []
    for _ in range(reps):
        rep: dict[str, list[float]] = {"head": [], "prompt": []}
        for i, row in enumerate(rows):
            for use_head in ((True, False) if i % 2 == 0 else (False, True)):
                start = time.perf_counter()
                _label_or_none(engine, task, row.text, use_head)
                rep["head" if use_head else "prompt"].append(time.perf_counter() - start)
        per_rep.append(ratio(latency_stats(rep["head"])["p50_ms"], latency_stats(rep["prompt"])["p50_ms"]))
        for key in samples:
            samples[key] += rep[key]
    head, prompt = latency_stats(samples["head"]), latency_stats(samples["prompt"])
    return {"head": head, "prompt": prompt, "p50_head_over_prompt": ratio(head["p50_ms"], prompt["p50_ms"]),
            "p50_ratio_per_rep": per_rep}


def _label_or_none(engine, task: str, text: str, use_head: bool = True) -> str | None:
    try:
        return engine.classify(task, [text], use_head)[0].label
    except EngineError:  # refused (too long): no label, counted wrong
        return None


def burst(engine, task: str, texts: Sequence[str]) -> dict:
    """Submit every text at once to a real Service; wall time until the last answer."""
    sink = _Collector(len(texts))
    calls = _Recorder(engine)
    service = Service(calls, sessions=SessionStore(1, 60.0), queue_size=max(64, len(texts)),
                      max_batch=engine.max_batch)
    engine.idle()  # this thread hands the engine to the service's worker, as the daemon's main thread does
    service.start()
    try:
        start = time.perf_counter()
        for i, text in enumerate(texts):
            service.submit(Job(task=task, id=i, text=text, sink=sink))
        sink.done.wait()
        wall = time.perf_counter() - start
    finally:
        service.stop(timeout=60.0)
    latencies = [o.latency_ms / 1000 for o in sink.outcomes]
    stats = latency_stats(latencies, wall_s=wall)
    return {**stats, "wall_s": wall, "batch": engine.max_batch, "errors": sum(not o.ok for o in sink.outcomes),
            "engine_calls": len(calls.batches), **padding(engine, task, texts, calls.batches),
            "samples_ms": _ms(latencies)}


def padding(engine, task: str, texts: Sequence[str], batches: list[list[str]]) -> dict:
    """Text tokens vs tokens the forwards computed (right padding) for the batches the queue handed the
    engine, each grouped into chunks by `classify.length_chunks` as the engine does."""
    def tokens(text: str) -> int:
        return len(encode(engine.loaded.tokenizer, engine.tasks[task].render_user(text)))

    forwards = []  # the token lengths of each forward pass's rows
    for batch in batches:
        lengths = [tokens(t) for t in batch]
        forwards += [[lengths[i] for i in chunk] for chunk in length_chunks(lengths, engine.max_batch)]
    return {"text_tokens": sum(tokens(t) for t in texts), "forward_calls": len(forwards),
            "padded_tokens": sum(max(rows) * len(rows) for rows in forwards)}


class _Recorder:
    """The engine, with the texts of every classify call noted."""

    def __init__(self, engine):
        self._engine, self.batches = engine, []

    def classify(self, task: str, texts: Sequence[str]):
        self.batches.append(list(texts))
        return self._engine.classify(task, texts)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


class _Collector:
    """A ReplySink for many jobs: keeps outcomes, sets `done` at the n-th."""

    def __init__(self, n: int):
        self.n, self.outcomes, self.done = n, [], threading.Event()
        self._lock = threading.Lock()
        if n == 0:
            self.done.set()

    def chunk(self, seq: int, delta: str) -> None:
        pass

    def finish(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)
            if len(self.outcomes) >= self.n:
                self.done.set()


def _accuracy(labels: list[str], rows: Sequence[Row], predicted: list) -> dict:
    scored = Scored(labels, [r.label for r in rows], list(predicted))
    summary = scored.summary()
    return {"accuracy": summary["accuracy"], "no_label": summary["no_label"], "confusion": summary["confusion"]}


def _ms(seconds: list[float]) -> list[float]:
    return [round(1000 * s, 2) for s in seconds]
