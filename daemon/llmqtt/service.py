"""The work queue between the transport and the engine, and the one loop that runs the engine. No paho,
no torch.

One worker thread runs all inference in steps, never a whole answer at once (`_run`, policy in
`_next_step`): a step is a classification batch, the start of a generation (its prompt), or one decode step
for every active generation together. Classification is cheap and latency-sensitive, so it goes first, and
classification requests that wait together for the same task run as one batched forward pass; up to
`max_generations` chats stream side by side, sharing each decode forward pass, and get a classification
answered between two of their tokens. Everything that is accepted gets exactly one `ReplySink.finish`;
what is refused at the door (queue full) is answered at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Callable, Protocol

from .engine.types import EngineError, GenerationResult, GenerationStream, InferenceEngine
from .jobs import Failure, Job, Outcome, ReplySink, RequestId, ServiceHealth, Submitted  # noqa: F401 (re-exported)
from .sessions import SessionStore
from .stats import ServiceStats
from .tasks import ClassifyTask, GenerateTask

log = logging.getLogger(__name__)

# Outcomes that say something about the request itself may be replayed to a retry with the same id;
# transient refusals (busy, expired, low memory, cancelled, internal) must not be.
_TRANSIENT = frozenset({"busy", "expired", "cancelled", "low_memory", "internal"})


class MemoryPressure(Protocol):
    """What the service asks of memoryguard.MemoryGuard while serving."""

    def allow_generation(self) -> bool: ...

    def batch_limit(self, max_batch: int) -> int: ...


class Service:
    def __init__(self, engine: InferenceEngine, *, sessions: SessionStore, queue_size: int = 64,
                 max_batch: int = 16, max_generations: int = 4, default_deadline_ms: int | None = None,
                 dedup_size: int = 512,
                 memory: MemoryPressure | None = None,
                 observer: Callable[[Job, Outcome], None] | None = None,
                 heartbeat: Callable[[], None] | None = None, idle_wait_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.sessions = sessions
        self.stats = ServiceStats()
        self._queue_size = queue_size
        self._max_batch = max_batch
        self._max_generations = max(1, max_generations)  # generations decoding side by side (runtime.max_generations)
        self._default_deadline_ms = default_deadline_ms
        self._dedup_size = dedup_size
        self._memory = memory  # memoryguard.MemoryGuard: smaller batches and no generation when low
        self._observer = observer  # HOOK(logs): per-request log line
        # HOOK(systemd): Watchdog.beat — called per job, per generated piece and per idle wait, so a hung
        # inference stops the beats while an idle daemon keeps them going.
        self._heartbeat = heartbeat or (lambda: None)
        self._idle_wait_s = idle_wait_s
        self._clock = clock
        self._cond = threading.Condition()
        self._classify_q: deque[Job] = deque()
        self._generate_q: deque[Job] = deque()
        self._running: list[Job] = []  # the classification batch or the generation being started, this step
        self._active: list[_Active] = []  # generations started and not yet done: each decode step runs them all
        self._last_step = ""
        self._inflight: dict[tuple, list[ReplySink]] = {}  # key -> sinks of duplicates waiting for it
        self._answered: OrderedDict[tuple, Outcome] = OrderedDict()
        self._stopping = False
        self._silenced = False  # set when stop() gave up on the running work: its answers are dropped
        self._worker: threading.Thread | None = None

    # -- the door ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._run, name="llmqtt-worker", daemon=True)
        self._worker.start()

    def submit(self, job: Job, *, hold: bool = False) -> Submitted:
        """Queue a job without blocking; answers at once when it cannot be queued. With `hold`, a full queue
        is not answered `busy` but returned as FULL: the caller keeps the job and submits it again later
        (MQTT can, as the request stays unacknowledged at the broker meanwhile)."""
        if job.received is None:
            job.received = self._clock()
        if job.deadline_ms is None:
            job.deadline_ms = self._default_deadline_ms
        if job.task not in self.engine.tasks:
            name = job.task if len(job.task) <= 80 else f"{job.task[:80]}..."  # the name comes from a client
            self._finish_now(job, Failure("unknown_task", f"no task named {name!r}"))
            return Submitted.REJECTED
        with self._cond:
            if self._stopping:
                return Submitted.STOPPED
            replay = self._answered.get(job.key)
            if replay is not None:
                self._answered.move_to_end(job.key)
            elif job.key in self._inflight:
                self._inflight[job.key].append(job.sink)  # answered together with the running one
                return Submitted.DUPLICATE
            else:
                waiting = {"classify": len(self._classify_q), "generate": len(self._generate_q)}
                depth = sum(waiting.values())
                if depth < self._queue_size:
                    self._inflight[job.key] = []
                    self._queue_for(job).append(job)
                    self._cond.notify()
                    return Submitted.QUEUED
                if hold:
                    return Submitted.FULL
        if replay is not None:
            job.sink.finish(replace(replay, cached=True))
            return Submitted.DUPLICATE
        self._finish_now(job, Failure("busy", f"queue full ({depth} waiting)",
                                      retry_after_ms=self.stats.retry_after_ms(waiting)))
        return Submitted.REJECTED

    def cancel(self, task: str, request_id: RequestId) -> bool:
        """Drop a queued job (answered `cancelled`) or stop a running generation; False if unknown."""
        key = (task, request_id)
        with self._cond:
            for queue in (self._classify_q, self._generate_q):
                job = next((j for j in queue if (j.task, j.id) == key), None)
                if job is not None:
                    queue.remove(job)
                    break
            else:
                running = next((j for j in self._in_hand() if (j.task, j.id) == key), None)
                if running is not None:
                    running.cancel.set()  # the engine stops at the next token; the worker answers
                return running is not None
        self._complete(job, Failure("cancelled", "cancelled while queued"), started=None)
        return True

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._classify_q) + len(self._generate_q)

    def health(self) -> ServiceHealth:
        return ServiceHealth(model=self.engine.model_name, dtype=self.engine.dtype, queue_depth=self.queue_depth(),
                             sessions=len(self.sessions), stats=self.stats.snapshot(),
                             decode=self.engine.fast_decode_state())

    def stop(self, timeout: float) -> bool:
        """Take no more work; wait up to `timeout` for the running step and the active generations. Queued
        jobs are dropped unanswered (the transport leaves them unacknowledged, so the broker redelivers them
        after a restart).

        Returns False if they did not finish in time; they are then cancelled and their answers dropped.
        """
        with self._cond:
            self._stopping = True
            dropped = len(self._classify_q) + len(self._generate_q)
            self._classify_q.clear()
            self._generate_q.clear()
            self._cond.notify_all()
        if dropped:
            log.info("left %d queued request(s) for redelivery", dropped)
        if self._worker is None:
            return True
        self._worker.join(timeout)
        if not self._worker.is_alive():
            return True
        with self._cond:
            self._silenced = True
            for job in self._in_hand():
                job.cancel.set()
        return False

    # -- the worker: one step at a time ------------------------------------------------------------

    def _in_hand(self) -> list[Job]:
        """Jobs the worker has taken: this step's, and every active generation's. Under the lock."""
        return [*self._running, *(a.job for a in self._active)]

    def _queue_for(self, job: Job) -> deque[Job]:
        return self._classify_q if isinstance(self.engine.tasks[job.task], ClassifyTask) else self._generate_q

    def _run(self) -> None:
        """The step loop. Each turn runs one step, chosen by `_next_step`: a classification batch, the start
        of waiting generations (their prompts' prefill), or one decode step for every active generation."""
        while True:
            step = self._next_step()
            if step is None:
                return
            kind, jobs = step
            started = self._clock()
            try:
                if kind == "classify":
                    self._classify(jobs)
                elif kind == "admit":
                    self._admit(jobs)
                else:
                    self._decode()
            except Exception:  # a bug here must not kill the only worker; answer what is left
                log.exception("worker failed on a %s step", kind)
                self._fail_step(kind, jobs)
            finally:
                if kind == "classify":
                    self.stats.record_work(kind, len(jobs), self._clock() - started)  # the drain rate for `busy`
                with self._cond:
                    self._running = []
                    self._last_step = kind
                    idle = not self._has_work()
                self._heartbeat()
                if idle:  # its OpenMP threads go until the next step (the engine's `idle`)
                    self.engine.idle()

    def _has_work(self) -> bool:
        """Under the lock."""
        return bool(self._classify_q or self._startable() or self._active)

    def _next_step(self) -> tuple[str, list[Job]] | None:
        """The policy, all of it. Block until there is something to do; None once stopping and idle.

        1. Classification first: it is one short forward pass and its callers wait for the whole answer.
           Not twice in a row while generations are active or may start: a flood of classifications slows
           their streams (one batch between two tokens) but never stops them.
        2. Start the waiting generations while fewer than `max_generations` run (memory for their KV caches),
           their prompts in one forward pass.
        3. One decode step for every active generation: one forward for all of them.
        """
        with self._cond:
            while not self._stopping and not self._has_work():
                if not self._cond.wait(self._idle_wait_s):
                    self._heartbeat()
            if self._stopping:  # queued work was dropped by stop(); active generations finish
                return ("decode", []) if self._active else None
            startable = self._startable()
            generations_wait = bool(self._active or startable)
            if self._classify_q and not (generations_wait and self._last_step == "classify"):
                task = self._classify_q[0].task
                limit = self._memory.batch_limit(self._max_batch) if self._memory else self._max_batch
                batch = [j for j in self._classify_q if j.task == task][:limit]
                for job in batch:
                    self._classify_q.remove(job)
                self._running = batch
                return "classify", batch
            if startable:  # their prompts run together
                for job in startable:
                    self._generate_q.remove(job)
                self._running = startable
                return "admit", startable
            return "decode", []

    def _startable(self) -> list[Job]:
        """Waiting generations that may start now, oldest first: as many as there are free places, and never
        two of one session at once (the second one's history must hold the first one's answer). Under the lock."""
        room = self._max_generations - len(self._active)
        busy = {(a.job.task, a.job.session) for a in self._active if a.job.session}
        startable: list[Job] = []
        for job in self._generate_q:
            if len(startable) == room:
                break
            if job.session and (job.task, job.session) in busy:
                continue
            if job.session:
                busy.add((job.task, job.session))
            startable.append(job)
        return startable

    def _classify(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not self._expire(job)]
        if not live:
            return
        started = self._clock()
        try:
            results = self.engine.classify(live[0].task, [job.text for job in live])
        except EngineError as exc:
            if len(live) > 1:  # one bad text must not fail its batch-mates: retry them one by one
                for job in live:
                    self._classify([job])
                return
            self._complete(live[0], Failure(exc.code, str(exc)), started)
            return
        if len(results) != len(live):
            raise RuntimeError(f"engine returned {len(results)} results for {len(live)} texts")
        for job, result in zip(live, results):
            self._complete(job, result.as_dict(), started)

    def _admit(self, jobs: list[Job]) -> None:
        """Start generations: their prompts through the model together, and each one's first token; they then
        decode with the rest."""
        starting = []
        for job in jobs:
            if self._expire(job):
                continue
            active = _Active(job, self._clock())
            if self._memory is not None and not self._memory.allow_generation():
                self._complete(job, Failure("low_memory", "not enough free memory to generate now"), active.started)
                continue
            if job.history is not None:
                history = list(job.history)
            else:
                history = self.sessions.history(job.task, job.session) if job.session else []
            try:
                active.stream = self.engine.generate(job.task, job.text, history, cancel=job.cancel,
                                                     max_new_tokens=job.max_new_tokens, options=job.options)
            except EngineError as exc:  # refused before it ran (too long, control tokens): this one alone
                self._complete(job, Failure(exc.code, str(exc)), active.started)
                continue
            except Exception:  # a bug preparing this one must not fail the others
                log.exception("preparing %s/%s failed", job.task, job.id)
                self._complete(job, Failure("internal", "internal error"), active.started)
                continue
            starting.append(active)
        if not starting:
            return
        with self._cond:
            self._active += starting
        try:
            pieces = self.engine.start([a.stream for a in starting])
        except EngineError as exc:
            for active in starting:
                self._drop(active)
                self._complete(active.job, Failure(exc.code, str(exc)), active.started)
            return
        for active, piece in zip(starting, pieces):
            self._deliver(active, piece)

    def _decode(self) -> None:
        """One decode step for every active generation; each gets its new text, the finished are answered."""
        actives = list(self._active)
        if not actives:
            return
        pieces = self.engine.step([a.stream for a in actives])
        for active, piece in zip(actives, pieces):
            self._deliver(active, piece)

    def _deliver(self, active: _Active, piece: str) -> None:
        """A generation's new text goes out as the next chunk; once it is done, its answer."""
        job, stream = active.job, active.stream
        if piece:
            self._heartbeat()
            if job.stream:
                self._send_chunk(job, active.seq, piece)
            active.seq += 1
        if not stream.done:
            return
        self._drop(active)
        result = stream.result
        # The drain rate behind `busy`: a generation's time, shared with up to max_generations side by side.
        self.stats.record_work("generate", 1, (self._clock() - active.started) / self._max_generations)
        if result.finish_reason == "cancelled":
            self._complete(job, Failure("cancelled", "cancelled while generating",
                                        partial=generation_dict(result)), active.started)
            return
        if job.session:
            spec = self.engine.tasks[job.task]
            max_turns = spec.history.max_turns if isinstance(spec, GenerateTask) else 0
            self.sessions.append(job.task, job.session, job.text, result.text, max_turns)
        self.stats.record_tokens_per_s(result.tokens_per_s)
        self._complete(job, generation_dict(result), active.started)

    def _drop(self, active: _Active) -> None:
        """Out of the active set, its KV cache released."""
        with self._cond:
            if active in self._active:
                self._active.remove(active)
        if active.stream is not None:
            active.stream.close()

    def _fail_step(self, kind: str, jobs: list[Job]) -> None:
        """After a bug in a step: answer `internal` to what the step had in hand and was not answered yet: the
        classification batch, or the generations it started or stepped."""
        hit = list(self._active) if kind == "decode" else [a for a in self._active if a.job in jobs]
        for active in hit:
            self._drop(active)
        for job in [*(jobs if kind == "classify" else []), *(a.job for a in hit)]:
            self._complete(job, Failure("internal", "internal error"), started=None)

    def _send_chunk(self, job: Job, seq: int, delta: str) -> None:
        if self._silenced:
            return
        try:
            job.sink.chunk(seq, delta)
        except Exception:  # a failed chunk must not lose the final answer
            log.exception("sending chunk %d of %s/%s failed", seq, job.task, job.id)

    def _expire(self, job: Job) -> bool:
        """Answer `expired` (and return True) if the job's deadline passed while it waited."""
        if job.deadline_ms is None:
            return False
        waited_ms = (self._clock() - job.arrived) * 1000
        if waited_ms <= job.deadline_ms:
            return False
        self._complete(job, Failure("expired", f"deadline of {job.deadline_ms} ms passed after "
                                               f"{waited_ms:.0f} ms in the queue"), started=None)
        return True

    # -- answers ----------------------------------------------------------------------------------

    def _finish_now(self, job: Job, failure: Failure) -> None:
        outcome = Outcome(job.task, job.id, error=failure)
        self.stats.record(outcome)
        self._notify(job, outcome)
        job.sink.finish(outcome)

    def _complete(self, job: Job, answer: dict | Failure, started: float | None) -> None:
        """The one place a queued job is answered: timing, stats, dedup cache, duplicates waiting."""
        now = self._clock()
        outcome = Outcome(job.task, job.id,
                          result=answer if isinstance(answer, dict) else None,
                          error=answer if isinstance(answer, Failure) else None,
                          latency_ms=round((now - job.arrived) * 1000, 1),
                          queue_ms=round(((started if started is not None else now) - job.arrived) * 1000, 1))
        with self._cond:
            waiting = self._inflight.pop(job.key, [])
            if outcome.code not in _TRANSIENT:
                self._remember(job.key, outcome)
            silenced = self._silenced
        self.stats.record(outcome)
        self._notify(job, outcome)
        if silenced:
            return
        for sink in [job.sink, *waiting]:
            try:
                sink.finish(outcome if sink is job.sink else replace(outcome, cached=True))
            except Exception:
                log.exception("delivering the answer to %s/%s failed", job.task, job.id)

    def _remember(self, key: tuple, outcome: Outcome) -> None:
        if self._dedup_size <= 0:
            return
        self._answered[key] = outcome
        while len(self._answered) > self._dedup_size:
            self._answered.popitem(last=False)

    def _notify(self, job: Job, outcome: Outcome) -> None:
        if self._observer is None:
            return
        try:
            self._observer(job, outcome)
        except Exception:
            log.exception("request observer failed")


@dataclass(eq=False)
class _Active:
    """A generation the worker is stepping: its job, its stream, its next chunk's number."""

    job: Job
    started: float
    stream: GenerationStream | None = None
    seq: int = 0


def generation_dict(result: GenerationResult) -> dict:
    return {"text": result.text, "finish_reason": result.finish_reason, "tokens": result.new_tokens,
            "prompt_tokens": result.prompt_tokens, "cached_tokens": result.cached_prefix_tokens,
            "tokens_per_s": round(result.tokens_per_s, 2), "history_turns": result.history_turns_used,
            "first_token_ms": None if result.first_token_s is None else round(result.first_token_s * 1000, 1)}
