"""`llmqtt ha remove`: clear this board's Home Assistant discovery configs and sensor states from the broker.

A one-shot command with its own MQTT client, not part of the running daemon (extensions/homeassistant.py).
"""

from __future__ import annotations

import time
from typing import Mapping

from .config import Config
from .extensions import ha_payloads as ha
from .extensions.ha_payloads import Identity, Task
from .mqtt.topics import Topics
from .mqtt.transport import Inbound, MqttTransport


def remove_discovery(config: Config, tasks: Mapping[str, Task], *, connect_s: float = 10.0,
                     quiet_s: float = 1.0) -> list[str]:
    """Clear (empty retained payload) every discovery config and result state this node has on the broker,
    plus those today's tasks would have. Returns the cleared topics; raises ConnectionError without a broker.

    Uses its own client id, so a running daemon keeps its session (it republishes on its next connect or HA
    birth: stop it, or set `homeassistant.enabled: false`, first). With MQTT 5 the session ends with the
    connection; the transport keeps MQTT 3.1.1 sessions, so there the broker remembers this client's two
    subscriptions (a handful of queued configs per daemon start) until it is cleaned up."""
    mqtt = config.mqtt.model_copy(update={"client_id": f"llmqtt-{config.mqtt.node}-ha-remove",
                                          "session_expiry_s": 0})
    topics = Topics.from_config(mqtt, config.homeassistant)
    identity = Identity(node=mqtt.node, root=topics.root, prefix=topics.discovery_prefix, model="", version="")
    found = _RetainedCollector(identity)
    transport = MqttTransport(mqtt, password=mqtt.read_password())
    transport.subscribe(topics.discovery_filter(identity.node_id), found.config)
    transport.subscribe(topics.ha_state_filter, found.state)
    transport.start()
    try:
        if not transport.connected.wait(connect_s):
            raise ConnectionError(f"no connection to the broker at {mqtt.host}:{mqtt.port} within {connect_s:.0f}s")
        found.wait_quiet(quiet_s)
        topics = sorted(found.topics | set(ha.discovery_messages(identity, tasks))
                        | {topics.ha_state(name) for name in tasks})
        for topic in topics:
            transport.publish(topic, b"", qos=1, retain=True, on_delivered=lambda: None)
        if not transport.flush(connect_s):
            raise ConnectionError("the broker did not confirm every removal")
        return topics
    finally:
        transport.stop()


class _RetainedCollector:
    """Gathers the retained topics of this node while the broker replays them after SUBACK."""

    def __init__(self, identity: Identity):
        self.identity = identity
        self.topics: set[str] = set()
        self._last_seen = time.monotonic()

    def config(self, message: Inbound) -> None:
        if message.retain and message.payload and ha.is_ours(self.identity, message.payload):
            self._add(message.topic)

    def state(self, message: Inbound) -> None:
        if message.retain and message.payload:
            self._add(message.topic)

    def _add(self, topic: str) -> None:
        self.topics.add(topic)
        self._last_seen = time.monotonic()

    def wait_quiet(self, quiet_s: float, limit_s: float = 10.0) -> None:
        """Until nothing new arrived for `quiet_s` (the replay is over), at most `limit_s`."""
        started = self._last_seen = time.monotonic()
        while time.monotonic() - self._last_seen < quiet_s and time.monotonic() - started < limit_s:
            time.sleep(0.05)
