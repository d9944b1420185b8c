"""Home Assistant: MQTT discovery and result sensors fed from finished requests. (`llmqtt ha remove`, which
clears them from the broker: ha_remove.py.)

- On every connect, and a few random seconds after HA's birth message (`<prefix>/status` = `online`), the
  discovery configs (ha_payloads) are published retained; the random delay spreads the burst of many boards
  answering the same birth.
- Retained configs under this node's discovery topics that are not in today's set are what an earlier run
  published for a task that is gone: they are cleared (empty retained payload), and so are the retained
  state topics of gone tasks. Only retained messages count (they predate this connection), and only configs
  whose unique id is ours.
- Requests from HA arrive on `<root>/ha/<task>/request` (the text entities and the deploy/homeassistant
  script publish there; the shipped ACL lets only HA's broker user write it). The requests extension runs
  them like any request and hands each answer, errors and refusals included, to `answer`, which turns it
  into the task's state, published retained on `<root>/ha/<task>/state`: what its sensor shows and what
  the script waits for.
- `observe` is chained into the service's observer: with `update_from_all_requests`, successful requests
  of other clients update the state too.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any, Mapping

from ..config import HomeAssistantConfig
from ..jobs import ORIGIN_HOMEASSISTANT, Job, Outcome
from ..mqtt.messages import encode
from ..mqtt.topics import Topics
from ..mqtt.transport import Inbound, MqttTransport
from . import ha_payloads as ha
from .ha_payloads import Identity, Task

log = logging.getLogger(__name__)


class HomeAssistantExtension:
    name = "homeassistant"

    def __init__(self, transport: MqttTransport, topics: Topics, config: HomeAssistantConfig,
                 tasks: Mapping[str, Task], *, node: str, model: str, version: str,
                 birth_delay_s: tuple[float, float] = (1.0, 5.0)):
        self.transport = transport
        self.config = config
        self.tasks = dict(tasks)
        self.topics = topics
        self.identity = Identity(node=node, root=topics.root, prefix=topics.discovery_prefix,
                                 model=model, version=version, support_url=config.support_url)
        self.birth_delay_s = birth_delay_s
        self.messages = ha.discovery_messages(self.identity, self.tasks)
        self._last: dict[str, dict[str, Any]] = {}  # task -> its last published state (kept on errors)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._running = False

    def start(self) -> None:
        """Before the transport connects, so the subscriptions go out with the first CONNECT."""
        self.transport.subscribe(self.topics.ha_birth, self._on_birth)
        self.transport.subscribe(self.topics.discovery_filter(self.identity.node_id), self._on_config)
        self.transport.subscribe(self.topics.ha_state_filter, self._on_state)
        self.transport.add_connect_listener(self.publish_discovery)
        self._running = True
        log.info("Home Assistant discovery: %d entities under %s/+/%s/", len(self.messages),
                 self.identity.prefix, self.identity.node_id)

    def stop(self) -> None:
        self._running = False
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def publish_discovery(self) -> None:
        if not self._running:
            return
        for topic, payload in self.messages.items():
            self.transport.publish(topic, encode(payload), qos=1, retain=True)

    # -- answers (the service's worker thread or paho's network thread; publish never blocks) -----

    def answer(self, task: str, request_id: str | int | None, text: str, reply: Mapping[str, Any]) -> bytes:
        """The state for the answer to a request from HA (`reply` as the daemon would send it on MQTT):
        the result, or the error on top of the last good state. The caller publishes it retained on
        `topics.ha_state(task)`."""
        now = round(time.time(), 3)
        spec = self.tasks.get(task)
        with self._lock:
            if reply.get("status") == "ok" and spec is not None:
                state = ha.result_state(spec, request_id if request_id is not None else "", text,
                                        reply.get("result") or {}, source=ha.SOURCE_HA,
                                        latency_ms=reply.get("latency_ms", 0.0), ts=now)
            else:
                state = ha.error_state(self._last.get(task), request_id, text, reply.get("error") or {}, ts=now)
            self._last[task] = state
        return encode(state)

    def observe(self, job: Job, outcome: Outcome) -> None:
        """Other clients' successful requests, with update_from_all_requests (HA's own come via `answer`)."""
        task = self.tasks.get(job.task)
        if (not self._running or task is None or job.origin == ORIGIN_HOMEASSISTANT or not outcome.ok
                or not self.config.update_from_all_requests):
            return
        state = ha.result_state(task, job.id, job.text, outcome.result or {}, source=ha.SOURCE_OTHER,
                                latency_ms=outcome.latency_ms, ts=round(time.time(), 3))
        with self._lock:
            self._last[job.task] = state
        self.transport.publish(self.topics.ha_state(job.task), encode(state), qos=1, retain=True)

    # -- incoming (paho's network thread: never block) --------------------------------------------

    def _on_birth(self, message: Inbound) -> None:
        # A retained birth is an old one: the configs went out on connect anyway.
        if message.retain or message.payload.strip() != b"online":
            return
        delay = random.uniform(*self.birth_delay_s)
        log.info("Home Assistant is online; publishing discovery again in %.1fs", delay)
        timer = threading.Timer(delay, self.publish_discovery)
        timer.daemon = True
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()  # births in a row: one republish is enough
            self._timer = timer
        timer.start()

    def _on_config(self, message: Inbound) -> None:
        if not message.retain or not message.payload or message.topic in self.messages:
            return
        if not ha.is_ours(self.identity, message.payload):
            return
        log.info("removing the Home Assistant entity of a task that is gone: %s", message.topic)
        self.transport.publish(message.topic, b"", qos=1, retain=True)

    def _on_state(self, message: Inbound) -> None:
        if not message.retain or not message.payload:
            return
        task = self.topics.task_of_ha_state(message.topic)
        if task not in self.tasks:
            self.transport.publish(message.topic, b"", qos=1, retain=True)
            return
        try:
            state = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(state, dict):
            with self._lock:  # the last run's state, so an early error keeps the sensor's value
                self._last.setdefault(task, state)
