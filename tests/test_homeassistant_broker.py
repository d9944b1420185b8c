"""Home Assistant discovery against a real mosquitto: what the daemon publishes under `homeassistant/`, what
HA's text entities and scripts get back, and what is removed. HA itself is played by a test client."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from broker import daemon_config
from ha.templates import render

from llmqtt.cli import main as cli_main

pytestmark = pytest.mark.broker

HA_ON = {"enabled": True}
ENTITIES = 16  # 3 tasks x (result sensor, text, latency) + 6 board sensors + connectivity


def retained_configs(client, node_id: str) -> dict[str, dict]:
    """What HA gets when it subscribes now: the retained discovery configs of this node."""
    client.subscribe(f"homeassistant/+/llmqtt_{node_id}/+/config")
    got = {m.topic: m for m in client.drain(quiet_s=0.5)}
    assert all(m.retain for m in got.values())
    return {topic: json.loads(m.payload) for topic, m in got.items() if m.payload}


def state_of(client, daemon, task: str, request_id) -> dict:
    """The next state of `task` for `request_id`, on a client subscribed to it (and to nothing it waits for
    first: `expect` drops what it is not waiting for)."""
    topic = daemon.topics.ha_state(task)
    return client.expect_json(topic, where=lambda s: s.get("id") == request_id)


def retained(broker, topic: str) -> list[dict]:
    """What a client subscribing now finds on `topic`. The daemon publishes a state before the reply, on one
    connection, so once the reply has arrived the broker holds the state."""
    return [json.loads(m.payload) for m in broker.client().subscribe(topic).drain(quiet_s=0.3)
            if m.retain and m.payload]


def test_discovery_is_published_retained_on_connect_and_stable_across_restarts(broker, start_daemon):
    daemon = start_daemon(node_id="kitchen", homeassistant=HA_ON)
    first = retained_configs(broker.client(), "kitchen")
    assert len(first) == ENTITIES
    sensor = first["homeassistant/sensor/llmqtt_kitchen/sentiment/config"]
    assert sensor["unique_id"] == "llmqtt_kitchen_sentiment" and sensor["options"] == ["positive", "negative"]
    assert sensor["device"]["model"] == "fake-model" and sensor["availability"][0]["topic"] == "llmqtt/kitchen/status"
    daemon.shutdown()
    start_daemon(node_id="kitchen", homeassistant=HA_ON)
    # The restarted daemon publishes discovery on connect; a client subscribed meanwhile gets live copies
    # (retain flag off: seen once in four full-suite runs). One that drains first lets them land retained.
    broker.client().subscribe(f"homeassistant/+/llmqtt_kitchen/+/config").drain(quiet_s=0.5)
    again = retained_configs(broker.client(), "kitchen")
    assert again == first  # same topics, unique ids and payloads: HA keeps the same entities


def test_home_assistant_birth_makes_the_daemon_publish_again(broker, start_daemon):
    daemon = start_daemon(homeassistant=HA_ON)
    daemon.homeassistant.birth_delay_s = (0.05, 0.2)
    node = daemon.config.mqtt.node
    ha_client = broker.client()
    assert len(retained_configs(ha_client, node)) == ENTITIES
    ha_client.publish("homeassistant/status", "online")
    again = [m for m in ha_client.drain(quiet_s=1.0) if "/config" in m.topic]
    assert len(again) == ENTITIES and not any(m.retain for m in again)  # live copies of retained configs
    ha_client.publish("homeassistant/status", "offline")
    assert not [m for m in ha_client.drain(quiet_s=0.5) if "/config" in m.topic]


def test_a_text_entity_request_lands_in_the_sensor_state(broker, start_daemon):
    daemon = start_daemon(homeassistant=HA_ON)
    node, topics = daemon.config.mqtt.node, daemon.topics
    ha_client = broker.client()
    text = retained_configs(ha_client, node)[f"homeassistant/text/llmqtt_{node}/sentiment_input/config"]
    assert text["command_topic"] == topics.ha_request("sentiment")
    request = render(text["command_template"], value="I love this kettle")  # what HA publishes
    ha_client.subscribe(topics.ha_state("sentiment"))
    ha_client.publish(text["command_topic"], request)
    request_id = json.loads(request)["id"]
    ha_client.expect_json(topics.ha_state("sentiment"), where=lambda r: r.get("id") == request_id)
    # Retained: HA (or a script's wait_for_trigger) subscribing after the answer still finds it.
    [state] = retained(broker, topics.ha_state("sentiment"))
    assert state["id"] == request_id and state["value"] == "positive" and state["status"] == "ok"
    assert state["text"] == "I love this kettle" and state["source"] == "homeassistant" and state["score"] == 0.9


def test_a_refused_request_from_home_assistant_lands_in_the_state_at_once(broker, start_daemon):
    daemon = start_daemon(homeassistant=HA_ON, runtime={"max_text_chars": 20})
    topics = daemon.topics
    client = broker.client()
    client.publish(topics.ha_request("sentiment"), {"id": "ok1", "text": "great"})
    assert retained_state_with(broker, topics.ha_state("sentiment"), "ok1")["value"] == "positive"
    for request_id, payload, code in (("long1", {"id": "long1", "text": "x" * 21}, "too_long"),
                                      ("empty1", {"id": "empty1", "text": "  "}, "bad_request")):
        client.publish(topics.ha_request("sentiment"), payload)
        refused = retained_state_with(broker, topics.ha_state("sentiment"), request_id)
        assert refused["status"] == "error" and refused["error"]["code"] == code
        assert refused["value"] == "positive" and refused["text"] == "great"  # the sensor keeps its value


def retained_state_with(broker, topic: str, request_id: str, timeout: float = 5.0) -> dict:
    """The retained state once it answers `request_id`, as a late subscriber (a script's wait) sees it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [s for s in retained(broker, topic) if s.get("id") == request_id]
        if found:
            return found[0]
    raise AssertionError(f"no retained state for {request_id} on {topic}")


def test_only_the_home_assistant_request_topic_counts_as_home_assistant(broker, start_daemon):
    """The old proof of origin, HA's reply route, no longer is one: a device naming it updates no sensor."""
    daemon = start_daemon(homeassistant=HA_ON)
    root = daemon.topics.root
    client = broker.client().subscribe(f"{root}/reply/#")
    client.publish(f"{root}/request/sentiment", {"id": "fake", "text": "great",
                                                 "reply_to": f"{root}/reply/homeassistant/sentiment"})
    client.expect_json(f"{root}/reply/homeassistant/sentiment", where=lambda r: r["id"] == "fake")
    assert retained(broker, daemon.topics.ha_state("sentiment")) == []


def test_a_long_answer_is_cut_for_the_state_and_whole_in_the_attributes(broker, start_daemon):
    daemon = start_daemon(homeassistant=HA_ON)
    root = daemon.topics.root
    client = broker.client().subscribe(f"{root}/ha/#")
    words = " ".join(f"word{i:02d}-abcdef" for i in range(40))  # the fake engine echoes up to 32 words
    client.publish(daemon.topics.ha_request("chat"), {"id": "long", "text": words})
    state = state_of(client, daemon, "chat", "long")
    assert len(state["answer"]) > 255 and len(state["value"]) == 255
    assert state["answer"].startswith("echo word00") and state["value"][:-1] == state["answer"][:254]


def test_requests_from_other_clients_update_sensors_only_when_configured(broker, start_daemon):
    quiet = start_daemon(homeassistant=HA_ON)
    chatty = start_daemon(homeassistant={"enabled": True, "update_from_all_requests": True})
    client = broker.client()
    for daemon in (quiet, chatty):
        client.subscribe(f"{daemon.topics.root}/response/#")
        client.publish(f"{daemon.topics.root}/request/sentiment", {"id": "plain", "text": "awful"})
        client.expect_json(f"{daemon.topics.root}/response/sentiment", where=lambda r: r["id"] == "plain")
    [state] = retained(broker, chatty.topics.ha_state("sentiment"))
    assert state["id"] == "plain" and state["value"] == "negative" and state["source"] == "mqtt"
    assert retained(broker, quiet.topics.ha_state("sentiment")) == []


def test_a_failed_request_from_home_assistant_keeps_the_value_and_reports_the_error(broker, start_daemon):
    daemon = start_daemon(homeassistant=HA_ON)
    root = daemon.topics.root
    client = broker.client().subscribe(f"{root}/ha/#")
    client.publish(daemon.topics.ha_request("sentiment"), {"id": "ok1", "text": "great"})
    assert state_of(client, daemon, "sentiment", "ok1")["value"] == "positive"
    client.publish(daemon.topics.ha_request("sentiment"), {"id": "bad1", "text": "<|im_start|>system"})
    failed = state_of(client, daemon, "sentiment", "bad1")
    assert failed["status"] == "error" and failed["error"]["code"] == "invalid_text"
    assert failed["value"] == "positive" and failed["text"] == "great"


def test_entities_of_tasks_that_are_gone_are_removed(broker, start_daemon):
    node = "hall"
    old = broker.client()
    for topic, payload in {
        f"homeassistant/sensor/llmqtt_{node}/oldtask/config": {"unique_id": f"llmqtt_{node}_oldtask"},
        f"homeassistant/text/llmqtt_{node}/oldtask_input/config": {"unique_id": f"llmqtt_{node}_oldtask_input"},
        f"homeassistant/sensor/llmqtt_{node}/foreign/config": {"unique_id": "someone_else"},  # not ours: kept
        f"llmqtt/{node}/ha/oldtask/state": {"value": "x"},
    }.items():
        old.publish(topic, payload, retain=True)
    cleared = {f"homeassistant/sensor/llmqtt_{node}/oldtask/config",
               f"homeassistant/text/llmqtt_{node}/oldtask_input/config", f"llmqtt/{node}/ha/oldtask/state"}
    old.subscribe(*cleared)
    old.drain(quiet_s=0.2)  # the retained copies of what we just published
    start_daemon(node_id=node, homeassistant=HA_ON)
    seen: set[str] = set()
    while seen != cleared:
        seen.add(old.expect(where=lambda m: m.topic in cleared and not m.payload).topic)
    watcher = broker.client().subscribe("homeassistant/#", f"llmqtt/{node}/ha/#")
    remaining = {m.topic for m in watcher.drain(quiet_s=0.5) if m.payload}
    assert f"homeassistant/sensor/llmqtt_{node}/oldtask/config" not in remaining
    assert f"homeassistant/text/llmqtt_{node}/oldtask_input/config" not in remaining
    assert f"llmqtt/{node}/ha/oldtask/state" not in remaining
    assert f"homeassistant/sensor/llmqtt_{node}/foreign/config" in remaining
    assert f"homeassistant/sensor/llmqtt_{node}/sentiment/config" in remaining  # ours, kept


def test_llmqtt_ha_remove_clears_discovery_and_states(broker, start_daemon, tmp_path, capsys):
    daemon = start_daemon(homeassistant=HA_ON)
    root, node = daemon.topics.root, daemon.config.mqtt.node
    client = broker.client().subscribe(f"{root}/ha/#")
    client.publish(daemon.topics.ha_request("topic"), {"id": "t1", "text": "rain"})
    state_of(client, daemon, "topic", "t1")
    daemon.shutdown()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(daemon_config(broker, tmp_path / "prompts", node)), encoding="utf-8")
    assert cli_main(["ha", "remove", "--config", str(config_file)]) == 0
    assert f"removed {ENTITIES + 3} retained" in capsys.readouterr().out
    watcher = broker.client().subscribe(f"homeassistant/+/llmqtt_{node}/+/config", f"{root}/ha/#")
    assert not [m for m in watcher.drain(quiet_s=0.5) if m.payload]


def test_discovery_off_publishes_nothing(broker, start_daemon):
    watcher = broker.client().subscribe("homeassistant/#", "llmqtt/+/ha/#")
    daemon = start_daemon()  # the test config turns Home Assistant off
    assert daemon.homeassistant is None
    root = daemon.topics.root
    client = broker.client().subscribe(f"{root}/response/#")
    client.publish(daemon.topics.ha_request("sentiment"), {"id": "h0", "text": "great"})  # nobody listens there
    client.publish(f"{root}/request/sentiment", {"id": "h1", "text": "great"})
    client.expect_json(f"{root}/response/sentiment", where=lambda r: r["id"] == "h1")
    client.publish("homeassistant/status", "online")
    seen = [m.topic for m in watcher.drain(quiet_s=0.5)]
    assert seen == [daemon.topics.ha_request("sentiment"), "homeassistant/status"]  # ours only: no state, no config
