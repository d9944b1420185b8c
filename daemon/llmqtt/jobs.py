"""What a request is while the service works on it, and what comes back: plain values, no behaviour.

Imported by the service, its stats, every transport and extension, and the bench; imports nothing of
llmqtt itself, so none of them has to import another just for a type.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Union, cast

if TYPE_CHECKING:  # types only: this module imports nothing of llmqtt at run time
    from .engine.types import ChatOptions, Turn

RequestId = Union[str, int]  # as the client sent it; echoed back unchanged

# Where a request came from: a transport sets it, observers (Home Assistant's sensors) read it.
ORIGIN_MQTT = "mqtt"
ORIGIN_HOMEASSISTANT = "homeassistant"  # arrived on HA's request topic, which only HA's broker user may write
ORIGIN_HTTP = "http"
ORIGIN_LOCAL = "local"  # in-process callers: the bench, tests


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    retry_after_ms: int | None = None  # set with `busy`
    partial: dict | None = None  # a cancelled generation's text so far


@dataclass(frozen=True)
class Outcome:
    task: str
    id: RequestId
    result: dict | None = None
    error: Failure | None = None
    latency_ms: float = 0.0
    queue_ms: float = 0.0
    cached: bool = False  # replayed for a duplicate id, not computed for this delivery

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def code(self) -> str:
        """`ok`, or the error code."""
        return "ok" if self.error is None else self.error.code


class ReplySink(Protocol):
    """Where a job's answer goes (each transport implements it). Called from the worker thread."""

    def chunk(self, seq: int, delta: str) -> None: ...

    def finish(self, outcome: Outcome) -> None: ...


@dataclass(eq=False)
class Job:
    task: str
    id: RequestId
    text: str
    sink: ReplySink
    origin: str = ORIGIN_LOCAL  # one of the ORIGIN_* names
    session: str | None = None
    stream: bool = False
    max_new_tokens: int | None = None
    deadline_ms: int | None = None  # relative to `received`
    history: tuple[Turn, ...] | None = None  # a client that keeps its own conversation (HTTP APIs): not `session`
    options: ChatOptions | None = None  # a client's system prompt, sampling and stop strings (HTTP APIs)
    received: float | None = None  # clock() when it arrived; set by submit() when missing
    # The whole request as the transport received it (MQTT: a hash of topic, payload, Response Topic and
    # Correlation Data). Duplicates are recognised by task, id AND this: a redelivery is answered once, while
    # another client's request that reuses the id runs on its own and never gets someone else's answer.
    fingerprint: bytes | str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[str, RequestId, bytes | str | None]:
        """The de-duplication key. (Cancel names only task and id.)"""
        return (self.task, self.id, self.fingerprint)

    @property
    def arrived(self) -> float:
        return cast(float, self.received)  # set by Service.submit before the job goes anywhere


class Submitted(enum.Enum):
    QUEUED = "queued"
    DUPLICATE = "duplicate"  # the same request (Job.key) is running or was answered: answered from that
    REJECTED = "rejected"  # answered at once (busy, unknown task)
    STOPPED = "stopped"  # the service is shutting down: not answered, so the caller leaves it for redelivery
    FULL = "full"  # submit(hold=True) and the queue is full: not answered; the caller holds it and submits later


@dataclass(frozen=True)
class ServiceHealth:
    """A snapshot of the service for the health topic: what it serves and how it is doing."""

    model: str
    dtype: str
    queue_depth: int
    sessions: int
    stats: dict  # ServiceStats.snapshot(): ok/error counts, per-task latency percentiles, tokens/s
    decode: str | None = None  # the engine's compiled decode: "pending", "ready", "failed" or "off"


class JobQueue(Protocol):
    """What a transport needs of the service (`service.Service` implements it)."""

    def submit(self, job: Job, *, hold: bool = False) -> Submitted: ...

    def cancel(self, task: str, request_id: RequestId) -> bool: ...

    def health(self) -> ServiceHealth: ...
