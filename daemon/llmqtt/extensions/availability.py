"""Availability: the retained `<root>/status` topic and the Last Will that sets it `offline`.

`online` is published only when the daemon says so (after warm-up), and again after every reconnect;
the broker publishes the will (`offline`) when the connection dies without a clean disconnect.
"""

from __future__ import annotations

import logging
import threading
import time

from ..mqtt.messages import encode
from ..mqtt.topics import Topics
from ..mqtt.transport import MqttTransport

log = logging.getLogger(__name__)


class AvailabilityExtension:
    name = "availability"

    def __init__(self, transport: MqttTransport, topics: Topics, details: dict, wait_s: float = 5.0):
        self.transport = transport
        self.topics = topics
        self.details = details  # model, dtype, tasks, node, version: shown with every state
        self.wait_s = wait_s
        self._state: str | None = None  # what we last announced; None until online()

    def start(self) -> None:
        """Before the transport connects: the will must be in the CONNECT packet."""
        will = {"state": "offline", **self.details}  # no timestamp: it is published whenever we die
        self.transport.set_will(self.topics.status, encode(will), qos=1, retain=True)
        self.transport.add_connect_listener(self._on_connect)

    def online(self) -> None:
        self._state = "online"
        if self.transport.connected.is_set():
            self._publish("online")
        # else: _on_connect publishes it once the broker is reachable

    def stopping(self) -> None:
        self._state = "stopping"
        self._publish("stopping")

    def stop(self) -> None:
        """Announce `offline` and wait (bounded) until the broker has it, before the clean disconnect."""
        self._state = "offline"
        delivered = threading.Event()
        self._publish("offline", on_delivered=delivered.set)
        if self.transport.connected.is_set() and not delivered.wait(self.wait_s):
            log.warning("the broker did not confirm the offline status within %.0fs", self.wait_s)

    def payload(self, state: str) -> dict:
        return {"state": state, **self.details, "ts": round(time.time(), 3)}

    def _on_connect(self) -> None:
        if self._state in ("online", "stopping"):
            self._publish(self._state)

    def _publish(self, state: str, on_delivered=None) -> None:
        self.transport.publish(self.topics.status, encode(self.payload(state)), qos=1, retain=True,
                               on_delivered=on_delivered)
