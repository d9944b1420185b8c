"""Requests: `<base>/request/<task>` -> service -> reply topic; `<base>/cancel/<task>` -> service.cancel.
With Home Assistant on, also `<root>/ha/<task>/request` -> service -> the task's retained HA state (built by
the `ha_answer` callback), so HA's asks and their errors, refusals included, land where HA reads them.

Delivery contract: a request is acknowledged (PUBACK) only after its final reply has reached the broker,
so a daemon that dies mid-request gets it again after a restart. Everything that can go wrong with a
request is answered with a coded error on the best reply topic available and logged once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from typing import Any, Callable, Mapping, cast

from ..mqtt.messages import (BadRequest, Limits, Request, chunk_message, encode, error_reply, outcome_reply,
                             parse_cancel, parse_request)
from ..mqtt.routes import ReplyRoutes, is_publishable_topic, shorten
from ..mqtt.topics import Topics
from ..mqtt.transport import Inbound, MqttTransport
from ..jobs import ORIGIN_HOMEASSISTANT, ORIGIN_MQTT, Failure, Job, JobQueue, Outcome, RequestId, Submitted

log = logging.getLogger(__name__)

# (task, request id, text, the reply as it would go out on MQTT) -> the HA state payload for it
HaAnswer = Callable[[str, "RequestId | None", str, Mapping[str, Any]], bytes]


class RequestsExtension:
    name = "requests"

    def __init__(self, transport: MqttTransport, topics: Topics, service: JobQueue, limits: Limits,
                 model_name: str, node: str, routes: ReplyRoutes, hold_limit: int = 0,
                 ha_answer: HaAnswer | None = None):
        """`hold_limit`: how many requests may wait here, unacknowledged, while the service's queue is full,
        before more are answered `busy` (see `_submit`)."""
        self.transport = transport
        self.topics = topics
        self.ha_answer = ha_answer  # None: Home Assistant is off
        self.routes = routes  # where requesters may have replies published
        self.service = service
        self.limits = limits
        self.model_name = model_name
        self.node = node
        self._accepting = False
        self._closed = False
        self._lock = threading.Lock()
        self._unacked: dict[int, Inbound] = {}  # mid -> request whose reply is not delivered yet
        self._hold_limit = hold_limit
        self._held: deque[Job] = deque()  # arrived while the queue was full; submitted as it drains
        self._hold_lock = threading.RLock()  # re-entered when a submit answers at once (a cached reply)

    def start(self) -> None:
        for base in self.topics.request_bases():
            requests = self.topics.request_filter(base)
            self.transport.subscribe(self.topics.subscription(requests, base), self._on_request, match=requests,
                                     manual_ack=True, retain_as_published=True)
            self.transport.subscribe(self.topics.cancel_filter(base), self._on_cancel)
        if self.ha_answer is not None:
            self.transport.subscribe(self.topics.ha_request_filter, self._on_ha_request, manual_ack=True,
                                     retain_as_published=True)
        self._accepting = True

    def pause(self) -> None:
        """Stop taking requests (shutdown): new ones stay unacknowledged, so the broker redelivers them."""
        self._accepting = False
        with self._hold_lock:
            dropped, self._held = list(self._held), deque()
        with self._lock:
            for job in dropped:
                self._unacked.pop(cast(_Reply, job.sink).request.mid, None)

    def stop(self) -> None:
        """After this, late answers are dropped (their requests stay unacknowledged)."""
        self._accepting = False
        self._closed = True

    # -- incoming (paho's network thread: never block) --------------------------------------------

    def _on_request(self, message: Inbound) -> None:
        located = self.topics.task_of(message.topic)
        if located is not None:  # always: we subscribed to these
            self._handle(message, *located)

    def _on_ha_request(self, message: Inbound) -> None:
        task = self.topics.ha_task_of(message.topic)
        if task is not None:
            self._handle(message, self.topics.root, task, ORIGIN_HOMEASSISTANT)

    def _handle(self, message: Inbound, base: str, task: str, origin: str = ORIGIN_MQTT) -> None:
        if not self._accepting:
            return
        if message.retain:
            # A retained request would run again on every resubscribe; it is not a request, it is state.
            # (MQTT v5 subscriptions keep the flag, Retain As Published; see docs/mqtt-api.md for 3.1.1.)
            log.warning("ignored a retained message on %s (requests must not be retained)", shorten(message.topic))
            self._ack(message)
            return
        if not self._track(message):
            return
        default_topic = self.topics.response(task, base)
        parsed = parse_request(message.payload, task, self.limits, message.response_topic,
                               message.correlation_data)
        from_ha = origin == ORIGIN_HOMEASSISTANT
        if not from_ha:  # HA's answers go to the task's state, whatever route the request names
            parsed = self._refused_route(message, parsed) or parsed
        if isinstance(parsed, BadRequest):
            self._reject(message, parsed, default_topic, origin)
            return
        sink: _Reply
        if from_ha:
            sink = _StateReply(self, message, self.topics.ha_state(task), task, parsed.id, parsed.text)
        else:
            sink = _Reply(self, message, parsed.reply_to or default_topic, parsed.correlation_data, task, parsed.id)
        job = Job(task=task, id=parsed.id, text=parsed.text, sink=sink, origin=origin, session=parsed.session,
                  stream=parsed.stream and not from_ha, max_new_tokens=parsed.max_new_tokens,
                  deadline_ms=parsed.deadline_ms, received=message.received, fingerprint=fingerprint(message))
        self._submit(job)

    def _submit(self, job: Job) -> None:
        """Hand a job to the service, or hold it while the queue is full.

        Receive Maximum (= queue size) should keep the broker from sending more unacknowledged requests than
        the queue holds, but brokers overshoot: mosquitto 2.0.11 (Debian 12) sends up to the limit again
        after each PUBACK (a 30-request backlog at Receive Maximum 8 arrives within a few answers), and MQTT
        3.1.1 has no such limit at all. A request held here is still unacknowledged, so it is as safe as in
        the broker; it keeps its arrival time (deadline, queue_ms)."""
        with self._hold_lock:
            hold = len(self._held) < self._hold_limit
            if self._held and hold:  # behind those already waiting: first come, first served
                self._held.append(job)
                return
            result = self.service.submit(job, hold=hold)
            if result is Submitted.FULL:
                self._held.append(job)
        if result is Submitted.STOPPED:
            with self._lock:  # shutting down: leave it for redelivery
                self._unacked.pop(cast(_Reply, job.sink).request.mid, None)

    def _release_held(self) -> None:
        """Submit held requests while the queue has room (called as answers go out)."""
        with self._hold_lock:
            while self._held and self._accepting:
                job = self._held.popleft()  # off the list first: a submit may answer (and call us) at once
                if self.service.submit(job, hold=True) is Submitted.FULL:
                    self._held.appendleft(job)
                    return

    def _refused_route(self, message: Inbound, parsed: Request | BadRequest) -> BadRequest | None:
        """A `bad_reply_topic` error (for the default topic, with the Correlation Data) when the request,
        valid or not, names a reply route it may not have: the error never goes to the refused route."""
        if parsed.reply_to is None:
            return None
        why = self.routes.refusal(parsed.reply_to)
        if why is None:
            return None
        field = "Response Topic" if message.response_topic is not None else "reply_to"
        return BadRequest("bad_reply_topic", f"{field}: {shorten(parsed.reply_to)!r} {why}", parsed.task,
                          parsed.id, None, parsed.correlation_data)

    def _track(self, message: Inbound) -> bool:
        """Note a request as awaiting its ack; False for the broker resending one we are still working on
        (after a reconnect): the ack of the first delivery covers it."""
        with self._lock:
            if message.dup and message.mid in self._unacked:
                return False
            self._unacked[message.mid] = message
            return True

    def _reject(self, message: Inbound, bad: BadRequest, default_topic: str, origin: str = ORIGIN_MQTT) -> None:
        log.warning("bad request on %s (id %s): %s: %s", shorten(message.topic), bad.id, bad.code, bad.message)
        reply = error_reply(bad.task, bad.id, bad.code, bad.message, model=self.model_name, node=self.node)
        if origin == ORIGIN_HOMEASSISTANT and self.ha_answer is not None:
            payload = self.ha_answer(bad.task, bad.id, "", reply)
            self._publish_final(message, self.topics.ha_state(bad.task), None, payload, retain=True)
            return
        self._publish_final(message, bad.reply_to or default_topic, bad.correlation_data, encode(reply))

    def _on_cancel(self, message: Inbound) -> None:
        located = self.topics.task_of(message.topic)
        request_id = parse_cancel(message.payload)
        if located is None:
            return
        task = located[1]
        if request_id is None:
            log.warning("ignored a cancel on %s that names no request id", message.topic)
            return
        if self._cancel_held(task, request_id):
            log.info("cancel %s/%s: done (it was waiting for room in the queue)", task, request_id)
            return
        found = self.service.cancel(task, request_id)
        if not found and isinstance(request_id, str) and request_id.isdigit():
            found = self.service.cancel(task, int(request_id))  # `mosquitto_pub -m 42` for a request with id 42
        log.info("cancel %s/%s: %s", task, request_id, "done" if found else "no such queued or running request")

    def _cancel_held(self, task: str, request_id: RequestId) -> bool:
        with self._hold_lock:
            job = next((j for j in self._held if j.task == task and str(j.id) == str(request_id)), None)
            if job is None:
                return False
            self._held.remove(job)
        job.sink.finish(Outcome(job.task, job.id, error=Failure("cancelled", "cancelled while queued")))
        return True

    # -- outgoing ---------------------------------------------------------------------------------

    def _publish_final(self, request: Inbound, topic: str, correlation: bytes | None, payload: bytes, *,
                       retain: bool = False) -> None:
        if self._closed:
            return
        if not is_publishable_topic(topic):
            # Only the default topic of a request topic near MQTT's 65,535-byte limit gets here (a named
            # route was checked): `response` is one byte longer than `request`. Nowhere to answer.
            log.warning("cannot answer the request on %s: its reply topic is over MQTT's topic length limit; "
                        "acknowledged and dropped", shorten(request.topic))
            self._ack(request)
            return
        self.transport.publish(topic, payload, qos=1, retain=retain, correlation_data=correlation,
                               on_delivered=lambda: self._ack(request))

    def _ack(self, request: Inbound) -> None:
        with self._lock:
            self._unacked.pop(request.mid, None)
        self.transport.ack(request)

    def reply_for(self, outcome: Outcome) -> dict:
        return outcome_reply(outcome, model=self.model_name, node=self.node)


def fingerprint(message: Inbound) -> bytes:
    """What makes two deliveries the same request: topic, payload bytes, v5 Response Topic and Correlation
    Data. A redelivery matches; a different request that reuses an id (another device, new text) does not."""
    digest = hashlib.sha256()
    for part in (message.topic.encode(), message.payload, (message.response_topic or "").encode(),
                 message.correlation_data or b""):
        digest.update(len(part).to_bytes(4, "big") + part)  # length-prefixed: no two splits hash alike
    return digest.digest()


class _Reply:
    """The service's `ReplySink` for one MQTT request."""

    retain = False

    def __init__(self, ext: RequestsExtension, request: Inbound, topic: str, correlation: bytes | None,
                 task: str, request_id: str | int):
        self.ext, self.request, self.topic, self.correlation = ext, request, topic, correlation
        self.task, self.id = task, request_id

    def chunk(self, seq: int, delta: str) -> None:
        if self.ext._closed:
            return
        message = chunk_message(self.task, self.id, seq, delta)
        self.ext.transport.publish(self.topic, encode(message), qos=1, correlation_data=self.correlation)

    def payload(self, outcome: Outcome) -> bytes:
        return encode(self.ext.reply_for(outcome))

    def finish(self, outcome: Outcome) -> None:
        if outcome.cached and self.request.dup:
            # The broker resent a request we answered already (our ack was lost with the connection):
            # the requester has its answer; just acknowledge.
            self.ext._ack(self.request)
            return
        self.ext._publish_final(self.request, self.topic, self.correlation, self.payload(outcome), retain=self.retain)
        self.ext._release_held()  # this one left the queue a while ago: room for those held


class _StateReply(_Reply):
    """The answer to a request from Home Assistant: the task's state, retained (built by `ha_answer`), so a
    script that subscribes after the answer was published still gets it."""

    retain = True

    def __init__(self, ext: RequestsExtension, request: Inbound, topic: str, task: str, request_id: str | int,
                 text: str):
        super().__init__(ext, request, topic, None, task, request_id)
        self.text = text

    def chunk(self, seq: int, delta: str) -> None:
        return None  # HA requests never stream (HA shows the finished answer)

    def payload(self, outcome: Outcome) -> bytes:
        return self.ext.ha_answer(self.task, self.id, self.text, self.ext.reply_for(outcome))
