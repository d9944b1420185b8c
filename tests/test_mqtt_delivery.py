"""Delivery over a real broker: reconnect after a broker restart, fleet shared subscriptions."""

from __future__ import annotations

import collections
import socket

import pytest
from broker import wait_online
from fake_engine import make_engine

pytestmark = pytest.mark.broker


def test_broker_restart_reconnects_without_reloading(start_daemon, broker, tmp_path):
    engine = make_engine(tmp_path / "prompts")
    warmups = []
    engine.warmup = lambda: warmups.append("warm-up")
    engine.start_fast_decode = lambda: warmups.append("fast decode")  # after READY, once
    daemon = start_daemon(engine=engine)
    root = daemon.topics.root
    client = broker.client().subscribe(f"{root}/response/#")
    client.publish(f"{root}/request/sentiment", {"id": "before", "text": "love"})
    assert client.expect_json(where=lambda r: r["id"] == "before")["status"] == "ok"

    broker.restart()
    client = broker.client()  # the old test client lost its connection with the broker
    wait_online(client, root)  # republished after the daemon reconnected
    client.subscribe(f"{root}/response/#")
    client.publish(f"{root}/request/chat", {"id": "after", "text": "still here"})
    assert client.expect_json(where=lambda r: r["id"] == "after")["result"]["text"] == "echo still here"
    assert warmups == ["fast decode"] and daemon.engine is engine  # warm-up is build_engine's, before the daemon


def test_the_daemon_sends_each_packet_at_once_after_every_connect(start_daemon, broker):
    """TCP_NODELAY on the broker connection, set again after a reconnect: paho leaves Nagle's algorithm on,
    which holds a small packet (a stream chunk, a reply after a PUBACK) while an earlier one is unacknowledged."""
    daemon = start_daemon()
    first = daemon.transport._client.socket()
    assert first.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    broker.restart()
    wait_online(broker.client(), daemon.topics.root)
    again = daemon.transport._client.socket()
    assert again is not first and again.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_requests_published_while_the_daemon_is_away_are_served_after_reconnect(start_daemon, broker, tmp_path):
    daemon = start_daemon()
    root = daemon.topics.root
    client = broker.client().subscribe(f"{root}/response/#")
    broker.stop()
    daemon.transport.connected.clear()
    broker.start()
    # the persistent session (subscriptions) survived the broker restart: a request published before the
    # daemon is back is queued for it
    client = broker.client().subscribe(f"{root}/response/#")
    client.publish(f"{root}/request/sentiment", {"id": "queued-for-me", "text": "love"})
    assert client.expect_json(where=lambda r: r["id"] == "queued-for-me")["status"] == "ok"


def test_fleet_shares_work_and_answers_each_request_once(start_daemon, broker, tmp_path):
    fleet = {"fleet": {"enabled": True, "topic": "test/fleet", "group": "g1"}}
    daemons = [start_daemon(mqtt=fleet), start_daemon(mqtt=fleet)]
    client = broker.client().subscribe("test/fleet/response/#")
    ids = [f"f{i}" for i in range(20)]
    for request_id in ids:
        client.publish("test/fleet/request/sentiment", {"id": request_id, "text": "love"})
    replies = [client.expect_json("test/fleet/response/sentiment") for _ in ids]
    extra = [m for m in client.drain(0.5) if m.topic.startswith("test/fleet/response")]
    assert sorted(r["id"] for r in replies) == sorted(ids) and extra == []
    by_node = collections.Counter(r["node"] for r in replies)
    assert set(by_node) == {d.config.mqtt.node for d in daemons}, by_node
    # a fleet request can still name its own reply route
    client.subscribe("test/fleet/reply/me")
    client.publish("test/fleet/request/chat", {"id": "own", "text": "x"}, response_topic="test/fleet/reply/me")
    assert client.expect_json("test/fleet/reply/me")["id"] == "own"


def test_fleet_cancel_reaches_the_member_running_the_request(start_daemon, broker, tmp_path):
    fleet = {"fleet": {"enabled": True, "topic": "test/fleet2", "group": "g2"}}
    engines = [make_engine(tmp_path / "prompts") for _ in range(2)]
    for engine in engines:
        engine.token_delay_s = 0.05
    for engine in engines:
        start_daemon(engine=engine, mqtt=fleet)
    client = broker.client().subscribe("test/fleet2/response/#")
    words = " ".join(f"w{i}" for i in range(200))  # ~10 s unless cancelled
    client.publish("test/fleet2/request/chat", {"id": "long", "text": words, "stream": True})
    client.expect_json("test/fleet2/response/chat", where=lambda r: r.get("seq") == 0)
    client.publish("test/fleet2/cancel/chat", "long")
    final = client.expect_json("test/fleet2/response/chat", where=lambda r: "status" in r, timeout=5)
    assert final["error"]["code"] == "cancelled"
