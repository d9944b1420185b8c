"""The paho-mqtt 2.x client, wrapped: connect/reconnect, subscriptions, publish with delivery callbacks,
manual acknowledgement of received messages. The only module that imports paho.

Threads: paho's network thread runs `on_message` handlers (they must not block: inference runs on the
service's worker) and `on_publish`, which only queues the message id. A small "delivery" thread turns
those ids into the callbacks registered with `publish(on_delivered=...)` — this is how a request is
acknowledged only after its response reached the broker, without ever blocking paho's thread.
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..config import MqttConfig
from .routes import shorten

log = logging.getLogger(__name__)
_MAX_INFLIGHT = 100  # our QoS 1 publishes awaiting PUBACK at once (streamed chunks are QoS 1 too)


@dataclass(frozen=True)
class Inbound:
    """One received message, protocol details flattened."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool
    retain: bool
    response_topic: str | None = None  # MQTT v5 only
    correlation_data: bytes | None = None  # MQTT v5 only
    received: float = 0.0  # time.monotonic() on arrival


Handler = Callable[[Inbound], None]


@dataclass(frozen=True)
class _Subscription:
    topic_filter: str  # what is sent to the broker (may be `$share/...`)
    match: str  # what incoming topics are matched against
    handler: Handler
    manual_ack: bool  # the handler acks itself (later); otherwise acked when it returns
    retain_as_published: bool = False  # v5: live messages keep their retain flag (requests ignore retained)


class MqttTransport:
    def __init__(self, config: MqttConfig, password: str | None = None, receive_maximum: int | None = None):
        """`receive_maximum` (MQTT v5): at most this many unacknowledged QoS 1 messages are sent to us at a
        time; the broker keeps the rest. Requests are acknowledged only once answered, so the daemon passes
        its queue size: a backlog waits in the broker instead of overflowing the queue as `busy`."""
        self.config = config
        self.v5 = config.protocol == "5"
        self.receive_maximum = None if receive_maximum is None else max(1, min(receive_maximum, 65535))
        self.client_id = config.client_id or f"llmqtt-{config.node}"
        self.connected = threading.Event()
        self._subs: list[_Subscription] = []
        self._connect_listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()  # guards _pending and makes publish+register atomic
        self._pending: dict[int, tuple[Callable[[], None], str]] = {}  # mid -> (on_delivered, topic)
        self._delivered: queue.SimpleQueue[tuple[int, str | None] | None] = queue.SimpleQueue()
        self._delivery_thread: threading.Thread | None = None
        self._stopping = False
        self._client = self._build_client(password)

    # -- setup ------------------------------------------------------------------------------------

    def _build_client(self, password: str | None) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
                             clean_session=None if self.v5 else False,  # v5 sets clean_start at connect
                             manual_ack=True)
        paho_log = logging.getLogger("llmqtt.mqtt.paho")
        # While we disconnect on purpose, paho's loop may log "Client is not connected" as an error; noise.
        paho_log.addFilter(lambda record: not self._stopping)
        client.enable_logger(paho_log)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, password)
        tls = self.config.tls
        if tls is not None:
            client.tls_set(ca_certs=_str(tls.ca_file), certfile=_str(tls.cert_file), keyfile=_str(tls.key_file))
            client.tls_insecure_set(tls.insecure)
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(_MAX_INFLIGHT)  # streamed chunks are QoS 1 too
        client.on_socket_open = _send_at_once
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def set_will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = True) -> None:
        """Must be called before start()."""
        self._client.will_set(topic, payload, qos=qos, retain=retain)

    def add_connect_listener(self, listener: Callable[[], None]) -> None:
        """Called (on paho's thread) after every successful (re)connect, once subscriptions are sent."""
        self._connect_listeners.append(listener)

    def subscribe(self, topic_filter: str, handler: Handler, *, match: str | None = None,
                  manual_ack: bool = False, retain_as_published: bool = False) -> None:
        """Register a handler; (re)sent to the broker on every connect. `match` for `$share/` filters."""
        sub = _Subscription(topic_filter, match or topic_filter, handler, manual_ack, retain_as_published)
        self._subs.append(sub)
        if self.connected.is_set():
            self._client.subscribe(self._subscribe_list([sub]))

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until the broker answers."""
        self._delivery_thread = threading.Thread(target=self._deliveries, name="llmqtt-delivery", daemon=True)
        self._delivery_thread.start()
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.config.session_expiry_s
            if self.receive_maximum is not None:
                properties.ReceiveMaximum = self.receive_maximum
        log.info("connecting to %s:%d as %s (MQTT %s)", self.config.host, self.config.port, self.client_id,
                 self.config.protocol)
        self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s,
                                   clean_start=False if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                                   properties=properties)
        self._client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for outstanding deliveries, then disconnect cleanly (no Last Will)."""
        self.flush(timeout)
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._delivered.put(None)
        if self._delivery_thread is not None:
            self._delivery_thread.join(timeout)

    # -- publish / ack ----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None,
                on_delivered: Callable[[], None] | None = None) -> paho.MQTTMessageInfo:
        """Queue a message (never blocks on the network); `on_delivered` runs once the broker has it
        (PUBACK for QoS 1), on the delivery thread. While disconnected, paho keeps QoS 1 messages and
        sends them after reconnecting."""
        properties = None
        if self.v5 and correlation_data is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation_data
        with self._lock:  # registered before the delivery thread can look the id up
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            if on_delivered is not None:
                self._pending[info.mid] = (on_delivered, topic)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.error("publish to %s failed: %s", topic, paho.error_string(info.rc))
        return info

    def ack(self, message: Inbound) -> None:
        """Acknowledge a received QoS 1 message (PUBACK): the broker will not deliver it again."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def flush(self, timeout: float) -> bool:
        """Wait until every publish with `on_delivered` has been delivered; False on timeout, or at once
        when disconnected (nothing can be delivered then)."""
        deadline = time.monotonic() + timeout
        while self.connected.is_set() and time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.02)
        with self._lock:
            return not self._pending

    # -- paho callbacks (network thread) ----------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s; %s", connack_failure(self.config, reason_code), self._retrying())
            return
        log.info("connected to %s:%d (session present: %s)", self.config.host, self.config.port,
                 flags.session_present)
        if self._subs:
            client.subscribe(self._subscribe_list(self._subs))
        self.connected.set()
        for listener in list(self._connect_listeners):
            try:
                listener()
            except Exception:
                log.exception("connect listener failed")

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError` around the connect, so the exception is at hand.
        error = sys.exc_info()[1]
        log.warning("%s; %s", connect_failure(self.config, error), self._retrying())

    def _retrying(self) -> str:
        return f"retrying with backoff ({self.config.reconnect_min_s:g} to {self.config.reconnect_max_s:g} s)"

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if not self._stopping and was_connected:
            log.warning("lost the broker connection to %s:%d (%s); reconnecting", self.config.host,
                        self.config.port, reason_code)

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        props = message.properties
        inbound = Inbound(topic=message.topic, payload=bytes(message.payload), qos=message.qos, mid=message.mid,
                          dup=bool(message.dup), retain=bool(message.retain),
                          response_topic=getattr(props, "ResponseTopic", None) if props else None,
                          correlation_data=getattr(props, "CorrelationData", None) if props else None,
                          received=time.monotonic())
        sub = next((s for s in self._subs if paho.topic_matches_sub(s.match, inbound.topic)), None)
        if sub is None:
            log.debug("no handler for %s; acknowledged and dropped", inbound.topic)
            self.ack(inbound)
            return
        try:
            sub.handler(inbound)
        except Exception:  # a handler bug must not leave the message unacknowledged forever
            log.exception("handler for %s failed", inbound.topic)
            self.ack(inbound)
            return
        if not sub.manual_ack:
            self.ack(inbound)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # No locks here: paho holds its own message lock while calling us. A failure is a v5 PUBACK such as
        # 0x87 (the broker's ACL does not let this user write there); logged on the delivery thread.
        self._delivered.put((mid, str(reason_code) if reason_code.is_failure else None))

    # -- internals --------------------------------------------------------------------------------

    def _deliveries(self) -> None:
        while True:
            item = self._delivered.get()
            if item is None:
                return
            mid, refused = item
            with self._lock:
                callback, topic = self._pending.pop(mid, (None, None))
            if refused is not None:
                log.warning("the broker did not accept the message to %s: %s (check the broker's ACL for user %s)",
                            shorten(topic) if topic else f"publish {mid}", refused, self.config.username)
            if callback is None:
                continue
            try:
                callback()
            except Exception:
                log.exception("delivery callback failed")

    def _subscribe_list(self, subs: list[_Subscription]) -> list:
        if self.v5:
            return [(s.topic_filter, SubscribeOptions(qos=1, retainAsPublished=s.retain_as_published)) for s in subs]
        return [(s.topic_filter, 1) for s in subs]


def _send_at_once(client, userdata, sock) -> None:
    """Turn Nagle's algorithm off on the broker connection (TCP_NODELAY), which paho leaves on. With it on,
    a small packet waits while an earlier one is unacknowledged, and the peer's delayed ACK holds it up to
    40 ms: a reply right after the request's PUBACK, a stream chunk right after the one before."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (a websocket wrapper, a test's fake)
        pass


def _str(path) -> str | None:
    return None if path is None else str(path)


# -- why a connection failed, in one sentence ---------------------------------------------------------

def connect_failure(config: MqttConfig, error: BaseException | None) -> str:
    """The cause of a failed TCP/TLS connect, e.g. `cannot connect to the MQTT broker at x:1883: connection
    refused (nothing listens on that port, or a firewall rejects it)`."""
    where = f"cannot connect to the MQTT broker at {config.host}:{config.port}"
    if isinstance(error, ssl.SSLCertVerificationError):
        ca = config.tls.ca_file if config.tls is not None else None
        trust = f"the CA in mqtt.tls.ca_file ({ca})" if ca else "the system's CAs (no mqtt.tls.ca_file set)"
        return f"{where}: TLS certificate check failed against {trust}: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"{where}: TLS handshake failed ({error.reason or error}); is this port TLS, and is it the right one?"
    if isinstance(error, socket.gaierror):
        return f"{where}: host name {config.host!r} not found (DNS: {error.strerror})"
    if isinstance(error, ConnectionRefusedError):
        return f"{where}: connection refused (no broker listens on that port, or a firewall rejects it)"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"{where}: no answer (host down or unreachable, or a firewall drops the packets)"
    if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
        return f"{where}: host unreachable ({error.strerror})"
    if isinstance(error, OSError) and error.strerror:
        return f"{where}: {error.strerror}"
    return f"{where}: {error!r}"


def connack_failure(config: MqttConfig, reason_code) -> str:
    """The broker answered but refused us (CONNACK with a failure code)."""
    where = f"the MQTT broker at {config.host}:{config.port} refused the connection"
    name = str(reason_code)
    if name in ("Not authorized", "Bad user name or password"):
        who = f"as user {config.username!r}" if config.username else "without a user name (no mqtt.username)"
        return (f"{where}: not authorized {who} (the broker says: {name}); check mqtt.username, "
                "mqtt.password_file and the broker's password file")
    return f"{where}: {name}"
