"""Mixed load through `service.Service`, as the daemon serves it (issue #15): sentiment while chats stream,
and several chats at once sharing each decode step.

Per run (the section repeats it and reports each figure's median over the runs):
- the baselines: the same sentiments and one chat straight to the engine, no service (single-request
  latency must not suffer from the step loop);
- sentiment idle: `sentiments` messages one after another, nothing else running (latency from submit);
- sentiment while 2 chats stream: the same messages, each sent once the one before is answered, while two
  long chats stream (they are cancelled once the last sentiment is answered);
- one chat alone, then 4 chats submitted at once: first token (submit -> first chunk) of each, and tokens/s
  = tokens after the first / seconds from the first chunk of any to the last answer.
Greedy chats, each with its own question in front of the same long prompt, so no chat reuses another's KV.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable, Sequence

from ..engine.types import ChatOptions
from ..jobs import Job, Outcome
from ..service import Service
from ..sessions import SessionStore
from .chat import DECODE_PROMPT
from .timing import latency_stats, ratio

Tick = Callable[[int], None]
CHATS = 4  # concurrent chats in the throughput run
STREAMING = 2  # chats streaming while the sentiments run
LONG = 4096  # max_new_tokens of the chats streaming under the sentiments: they are cancelled, never finish


class _Sink:
    """One job's reply: when each chunk came, and the outcome."""

    def __init__(self) -> None:
        self.id: str = ""
        self.submitted = self.finished = time.perf_counter()
        self.chunk_times: list[float] = []
        self.outcome: Outcome | None = None
        self.done = threading.Event()

    def chunk(self, seq: int, delta: str) -> None:
        self.chunk_times.append(time.perf_counter())

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.finished = time.perf_counter()
        self.done.set()

    def wait(self) -> Outcome:
        if not self.done.wait(600):
            raise RuntimeError("no answer within 600 s")
        return self.outcome  # type: ignore[return-value]


class _Steps:
    """The engine, with its decode steps counted."""

    def __init__(self, engine):
        self._engine, self.count = engine, 0

    def step(self, generations):
        self.count += 1
        return self._engine.step(generations)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def mixed_load(engine, sentiment: str, chat: str, texts: Sequence[str], reps: int, chat_tokens: int,
               tick: Tick) -> dict:
    steps = _Steps(engine)
    service = Service(steps, sessions=SessionStore(4, 600.0), queue_size=64, max_batch=engine.max_batch,
                      max_generations=CHATS)
    service.start()
    runs = []
    try:
        for rep in range(reps):
            ask = _Asker(service, sentiment, chat, rep, steps)
            direct = _direct(engine, sentiment, chat, texts, chat_tokens, rep)  # the baselines, just before
            idle = ask.sentiments(texts)
            busy, streamed = ask.sentiments_while_chatting(texts)
            runs.append({**direct, "sentiment_idle": latency_stats(idle), "sentiment_busy": latency_stats(busy),
                         "chat_steps_while_busy": streamed, "one": ask.chats(1, chat_tokens),
                         "four": ask.chats(CHATS, chat_tokens)})
            tick(1)
    finally:
        service.stop(60.0)
    return summarise(runs)


def _direct(engine, sentiment: str, chat: str, texts: Sequence[str], chat_tokens: int, rep: int) -> dict:
    """The same requests straight to the engine, no service (the worker is idle meanwhile): what the step
    loop must not slow down."""
    seconds = []
    for text in texts:
        started = time.perf_counter()
        engine.classify(sentiment, [text])
        seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    stream = engine.generate(chat, f"Question {rep}.99. {DECODE_PROMPT}", max_new_tokens=chat_tokens,
                             options=ChatOptions(temperature=0.0))
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    engine.idle()  # back to the service's worker: one thread with OpenMP threads at a time, as in the daemon
    return {"direct_sentiment": latency_stats(seconds), "direct_chat": {
        "first_token_ms": 1000 * ((first or time.perf_counter()) - started), "tokens": stream.result.new_tokens,
        "tokens_per_s": stream.result.tokens_per_s}}


def summarise(runs: list[dict]) -> dict:
    """Each figure's median over the runs; the ratios are per run, then their median."""
    def med(values) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    per_run = [{"sentiment_p95_busy_over_idle": ratio(r["sentiment_busy"]["p95_ms"], r["sentiment_idle"]["p95_ms"]),
                "four_over_one_tokens_per_s": ratio(r["four"]["tokens_per_s"], r["one"]["tokens_per_s"]),
                "first_token_slowest_of_four_over_one": ratio(max(r["four"]["first_token_ms"]),
                                                              r["one"]["first_token_ms"][0]),
                "one_over_direct_tokens_per_s": ratio(r["one"]["tokens_per_s"], r["direct_chat"]["tokens_per_s"]),
                "one_over_direct_first_token": ratio(r["one"]["first_token_ms"][0], r["direct_chat"]["first_token_ms"]),
                "idle_over_direct_sentiment_p50": ratio(r["sentiment_idle"]["p50_ms"], r["direct_sentiment"]["p50_ms"])}
               for r in runs]
    out = {key: med(p[key] for p in per_run) for key in per_run[0]}
    for key in ("p50_ms", "p95_ms"):
        out[f"sentiment_idle_{key}"] = med(r["sentiment_idle"][key] for r in runs)
        out[f"sentiment_busy_{key}"] = med(r["sentiment_busy"][key] for r in runs)
    out |= {"direct_sentiment_p50_ms": med(r["direct_sentiment"]["p50_ms"] for r in runs),
            "direct_tokens_per_s": med(r["direct_chat"]["tokens_per_s"] for r in runs),
            "direct_first_token_ms": med(r["direct_chat"]["first_token_ms"] for r in runs),
            "one_tokens_per_s": med(r["one"]["tokens_per_s"] for r in runs),
            "four_tokens_per_s": med(r["four"]["tokens_per_s"] for r in runs),
            "one_first_token_ms": med(r["one"]["first_token_ms"][0] for r in runs),
            "four_first_token_ms": [med(r["four"]["first_token_ms"][i] for r in runs) for i in range(CHATS)],
            "one_step_ms": med(r["one"]["step_ms"] for r in runs), "four_step_ms": med(r["four"]["step_ms"] for r in runs),
            "chat_steps_while_busy": med(r["chat_steps_while_busy"] for r in runs),
            "sentiments": runs[0]["sentiment_idle"]["n"], "runs": runs, "per_run": per_run}
    return out


class _Asker:
    def __init__(self, service: Service, sentiment: str, chat: str, rep: int, steps: _Steps):
        self.service, self.sentiment, self.chat, self.rep, self.steps = service, sentiment, chat, rep, steps
        self._ids = iter(range(1_000_000))

    def _submit(self, task: str, text: str, **kw) -> _Sink:
        sink = _Sink()
        job = Job(task=task, id=f"mixed-{self.rep}-{next(self._ids)}", text=text, sink=sink, **kw)
        sink.id = job.id
        self.service.submit(job)
        return sink

    def sentiments(self, texts: Sequence[str]) -> list[float]:
        """Seconds from submit to answer, one message after the other."""
        seconds = []
        for text in texts:
            sink = self._submit(self.sentiment, text)
            sink.wait()
            seconds.append(sink.finished - sink.submitted)
        return seconds

    def _chat(self, i: int, max_new_tokens: int) -> _Sink:
        text = f"Question {self.rep}.{i}. {DECODE_PROMPT}"  # its own start: no KV reuse between chats
        return self._submit(self.chat, text, stream=True, max_new_tokens=max_new_tokens,
                            options=ChatOptions(temperature=0.0))

    def sentiments_while_chatting(self, texts: Sequence[str]) -> tuple[list[float], int]:
        """Sentiment latencies while STREAMING chats stream; and how many decode steps they made meanwhile."""
        chats = [self._chat(100 + i, LONG) for i in range(STREAMING)]
        while not all(len(c.chunk_times) >= 2 for c in chats):  # both past their prefill, streaming
            if any(c.done.is_set() for c in chats):
                raise RuntimeError("a chat ended before the sentiments ran")
            time.sleep(0.01)
        before = self.steps.count
        seconds = self.sentiments(texts)
        streamed = self.steps.count - before
        for c in chats:
            self.service.cancel(self.chat, c.id)
        for c in chats:
            c.wait()
        return seconds, streamed

    def chats(self, n: int, max_new_tokens: int) -> dict:
        sinks = [self._chat(i, max_new_tokens) for i in range(n)]
        outcomes = [s.wait() for s in sinks]
        if not all(o.ok for o in outcomes):
            raise RuntimeError(f"a chat failed: {[o.code for o in outcomes]}")
        tokens = sum(max(0, o.result["tokens"] - 1) for o in outcomes)  # type: ignore[index]
        firsts = [s.chunk_times[0] if s.chunk_times else s.finished for s in sinks]  # an empty answer: its end
        wall = max(s.finished for s in sinks) - min(firsts)
        steps = max(o.result["tokens"] for o in outcomes) - 1  # type: ignore[index]
        return {"first_token_ms": [1000 * (first - s.submitted) for first, s in zip(firsts, sinks)],
                "tokens": [o.result["tokens"] for o in outcomes], "tokens_per_s": tokens / wall if wall > 0 else None,
                "step_ms": 1000 * wall / steps if steps > 0 else None}  # type: ignore[index]
