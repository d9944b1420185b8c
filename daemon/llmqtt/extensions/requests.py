"""Requests: `<base>/request/<task>` -> service -> reply topic; `<base>/cancel/<task>` -> service.cancel.
With Home Assistant on, also `<root>/ha/<task>/request` -> service -> the task's retained HA state (built by
the `ha_answer` callback), so HA's asks and their errors, refusals included, land where HA reads them.

Delivery contract: a request is acknowledged (PUBACK) only after its final reply has reached the broker,
so a daemon that dies mid-request gets it again after a restart. Everything that can go wrong with a
request is answered with a coded error on the best reply topic available and logged once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from ..mqtt.messages import (BadRequest, Limits, Request, chunk_message, encode, error_reply, ok_reply,
                             parse_cancel, parse_request)
from ..mqtt.topics import Topics
from ..mqtt.transport import Inbound, MqttTransport
from ..service import ORIGIN_HOMEASSISTANT, ORIGIN_MQTT, Job, Outcome, Service, Submitted

# (task, request id, text, the reply as it would go out on MQTT) -> the HA state payload for it
HaAnswer = Callable[[str, "str | int | None", str, Mapping[str, Any]], bytes]

log = logging.getLogger(__name__)


class RequestsExtension:
    name = "requests"

    def __init__(self, transport: MqttTransport, topics: Topics, service: Service, limits: Limits,
                 model_name: str, node: str, ha_answer: HaAnswer | None = None):
        self.transport = transport
        self.ha_answer = ha_answer
        self.topics = topics
        self.service = service
        self.limits = limits
        self.model_name = model_name
        self.node = node
        self._accepting = False
        self._closed = False
        self._lock = threading.Lock()
        self._unacked: dict[int, Inbound] = {}  # mid -> request whose reply is not delivered yet

    def start(self) -> None:
        for base in self.topics.request_bases():
            requests = f"{base}/request/+"
            self.transport.subscribe(self.topics.subscription(requests, base), self._on_request, match=requests,
                                     manual_ack=True)
            self.transport.subscribe(f"{base}/cancel/+", self._on_cancel)
        if self.ha_answer is not None:
            self.transport.subscribe(self.topics.ha_requests, self._on_ha_request, manual_ack=True)
        self._accepting = True

    def pause(self) -> None:
        """Stop taking requests (shutdown): new ones stay unacknowledged, so the broker redelivers them."""
        self._accepting = False

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
            log.warning("ignored a retained message on %s (requests must not be retained)", message.topic)
            self._ack(message)
            return
        if not self._track(message):
            return
        default_topic = self.topics.response(task, base)
        parsed = parse_request(message.payload, task, self.limits, message.response_topic,
                               message.correlation_data)
        if isinstance(parsed, Request) and parsed.reply_to and self._is_input_topic(parsed.reply_to):
            # Replying onto a request or cancel topic would feed our own answers back to us.
            parsed = BadRequest("bad_request", "reply_to: must not be a request or cancel topic of this daemon",
                                task, parsed.id)
        if isinstance(parsed, BadRequest):
            self._reject(message, parsed, default_topic, origin)
            return
        if origin == ORIGIN_HOMEASSISTANT:
            # HA's answer is the task's state, whatever route the request named; HA shows no streaming.
            sink: _Reply = _StateReply(self, message, self.topics.ha_state(task), task, parsed.id, parsed.text)
            stream = False
        else:
            sink = _Reply(self, message, parsed.reply_to or default_topic, parsed.correlation_data, task, parsed.id)
            stream = parsed.stream
        job = Job(task=task, id=parsed.id, text=parsed.text, sink=sink, origin=origin, session=parsed.session,
                  stream=stream, max_new_tokens=parsed.max_new_tokens, deadline_ms=parsed.deadline_ms,
                  received=message.received)
        if self.service.submit(job) is Submitted.STOPPED:
            with self._lock:  # shutting down: leave it for redelivery
                self._unacked.pop(message.mid, None)

    def _track(self, message: Inbound) -> bool:
        """Note a request as awaiting its ack; False for the broker resending one we are still working on
        (after a reconnect): the ack of the first delivery covers it."""
        with self._lock:
            if message.dup and message.mid in self._unacked:
                return False
            self._unacked[message.mid] = message
            return True

    def _reject(self, message: Inbound, bad: BadRequest, default_topic: str, origin: str = ORIGIN_MQTT) -> None:
        log.warning("bad request on %s (id %s): %s: %s", message.topic, bad.id, bad.code, bad.message)
        reply = error_reply(bad.task, bad.id, bad.code, bad.message, model=self.model_name, node=self.node)
        if origin == ORIGIN_HOMEASSISTANT and self.ha_answer is not None:
            payload = self.ha_answer(bad.task, bad.id, "", reply)
            self._publish_final(message, self.topics.ha_state(bad.task), None, payload, retain=True)
            return
        self._publish_final(message, bad.reply_to or default_topic, bad.correlation_data, encode(reply))

    def _is_input_topic(self, topic: str) -> bool:
        return any(topic.startswith(f"{base}/{kind}/") for base in self.topics.request_bases()
                   for kind in ("request", "cancel"))

    def _on_cancel(self, message: Inbound) -> None:
        located = self.topics.task_of(message.topic)
        request_id = parse_cancel(message.payload)
        if located is None:
            return
        task = located[1]
        if request_id is None:
            log.warning("ignored a cancel on %s that names no request id", message.topic)
            return
        found = self.service.cancel(task, request_id)
        if not found and isinstance(request_id, str) and request_id.isdigit():
            found = self.service.cancel(task, int(request_id))  # `mosquitto_pub -m 42` for a request with id 42
        log.info("cancel %s/%s: %s", task, request_id, "done" if found else "no such queued or running request")

    # -- outgoing ---------------------------------------------------------------------------------

    def _publish_final(self, request: Inbound, topic: str, correlation: bytes | None, payload: bytes, *,
                       retain: bool = False) -> None:
        if self._closed:
            return
        self.transport.publish(topic, payload, qos=1, retain=retain, correlation_data=correlation,
                               on_delivered=lambda: self._ack(request))

    def _ack(self, request: Inbound) -> None:
        with self._lock:
            self._unacked.pop(request.mid, None)
        self.transport.ack(request)

    def reply_for(self, outcome: Outcome) -> dict:
        error = outcome.error
        if error is None:
            return ok_reply(outcome.task, outcome.id, outcome.result or {}, model=self.model_name,
                            latency_ms=outcome.latency_ms, queue_ms=outcome.queue_ms, node=self.node)
        details = {"retry_after_ms": error.retry_after_ms} if error.retry_after_ms is not None else None
        extra = {"result": error.partial} if error.partial is not None else {}
        return error_reply(outcome.task, outcome.id, error.code, error.message, model=self.model_name,
                           latency_ms=outcome.latency_ms, queue_ms=outcome.queue_ms, details=details,
                           node=self.node, **extra)


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
