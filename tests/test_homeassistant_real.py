"""llmqtt in a real Home Assistant (tests/ha: `homeassistant` from the package index in its own virtualenv),
on a mosquitto with the shipped ACL: HA logs in as `homeassistant`, the daemon as `llmqtt`, a device as
`device`. Everything is checked through HA's REST API, as a dashboard or an automation would see it.
Every test runs against each release in tests/ha/server.RELEASES (the newest for Python 3.13.0 and the
minimum we state), each with its own broker.

The daemons here run the fake engine (keyword labels, echo answers), except the `real_model` test.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml
from broker import DaemonProcess, daemon_config, daemons_on
from fake_engine import write_model_dir, write_prompts
from ha.server import RELEASES, acl_broker_running, home_assistant_running
from ha.templates import templates_in

from llmqtt.extensions import ha_payloads as ha

pytestmark = [pytest.mark.broker, pytest.mark.homeassistant]

ENTITIES = 16  # 3 tasks x (result sensor, text, latency) + 6 board sensors + connectivity
MAX_TEXT = 60  # the daemons' runtime.max_text_chars here: a longer text is refused (too_long)


@pytest.fixture(scope="session", params=list(RELEASES))
def hass(request, tmp_path_factory):
    """A Home Assistant of one release, on its own ACL broker (`hass.broker`): nothing retained by the other
    release's tests leaks into this one's."""
    release = request.param
    with acl_broker_running(tmp_path_factory.mktemp(f"ha-mosquitto-{release}")) as broker, \
            home_assistant_running(tmp_path_factory.mktemp(f"ha-{release}"), broker, RELEASES[release]) as instance:
        instance.broker, instance.release = broker, release
        yield instance


@pytest.fixture
def ha_broker(hass):
    return hass.broker


@pytest.fixture
def start_daemon(ha_broker, hass, tmp_path):
    """`start_daemon(node_id=..., engine=None, **sections) -> Daemon` on the ACL broker as user `llmqtt`."""
    login = {"username": "llmqtt", "password_file": str(ha_broker.password_file("llmqtt"))}
    yield from daemons_on(ha_broker, tmp_path, ha_broker.client_as("homeassistant"), mqtt=login,
                          homeassistant={"enabled": True}, runtime={"max_text_chars": MAX_TEXT})


def device_entities(hass, entity_id: str) -> list[str]:
    return hass.render("{{ device_entities(device_id(e)) | sort | join(',') }}", e=entity_id).split(",")


def wait_for_device(hass, node: str) -> None:
    """Discovery is asynchronous: until HA has created every entity of the board."""
    hass.wait_state(f"sensor.llmqtt_{node}_sentiment")
    deadline = time.monotonic() + 30
    while len(device_entities(hass, f"sensor.llmqtt_{node}_sentiment")) < ENTITIES and time.monotonic() < deadline:
        time.sleep(0.3)


def test_the_board_appears_as_one_device_with_its_entities(hass, start_daemon):
    start_daemon(node_id="kitchen")
    wait_for_device(hass, "kitchen")
    assert hass.get("/api/config")["version"] == hass.release
    entities = device_entities(hass, "sensor.llmqtt_kitchen_sentiment")
    assert len(entities) == ENTITIES and "text.llmqtt_kitchen_sentiment_input" in entities
    assert "binary_sensor.llmqtt_kitchen_status" in entities and "sensor.llmqtt_kitchen_board_cpu" in entities
    device = hass.render("{% set d = device_id('sensor.llmqtt_kitchen_sentiment') %}"
                         "{{ device_attr(d, 'name') }}|{{ device_attr(d, 'model') }}|{{ device_attr(d, 'manufacturer') }}")
    assert device == "llmqtt kitchen|fake-model|llmqtt"
    # Available, and `unknown` until the first request (documented).
    sentiment = hass.wait_state("sensor.llmqtt_kitchen_sentiment", lambda s: s["state"] != "unavailable")
    assert sentiment["state"] == "unknown"
    # An enum sensor's options survive (HA before 2024.9 dropped them from MQTT discovery).
    assert sentiment["attributes"]["options"] == ["positive", "negative"]
    assert hass.wait_state("binary_sensor.llmqtt_kitchen_status", lambda s: s["state"] == "on")
    problems = [line for line in hass.log().splitlines()  # e.g. an option HA finds invalid or deprecated
                if "components.mqtt" in line and ("WARNING" in line or "ERROR" in line)]
    assert not problems, problems


def test_typing_into_a_text_box_shows_the_label_and_a_refusal_reaches_the_sensor(hass, start_daemon):
    start_daemon(node_id="hall")
    hass.wait_state("text.llmqtt_hall_sentiment_input", lambda s: s["state"] != "unavailable")
    hass.call("text", "set_value", {"entity_id": "text.llmqtt_hall_sentiment_input", "value": "I love this kettle"})
    shown = hass.wait_state("sensor.llmqtt_hall_sentiment", lambda s: s["state"] == "positive")
    assert shown["attributes"]["text"] == "I love this kettle" and shown["attributes"]["score"] == 0.9
    assert shown["attributes"]["source"] == "homeassistant" and shown["attributes"]["id"].startswith("ha-")
    hass.call("text", "set_value", {"entity_id": "text.llmqtt_hall_sentiment_input", "value": "x" * (MAX_TEXT + 1)})
    refused = hass.wait_state("sensor.llmqtt_hall_sentiment", lambda s: s["attributes"].get("status") == "error")
    assert refused["state"] == "positive"  # keeps its value; the error is in the attributes
    assert refused["attributes"]["error"]["code"] == "too_long"


def test_the_script_returns_the_answer_and_a_coded_error_within_a_second(hass, start_daemon):
    start_daemon(node_id="study")
    ask = {"task": "sentiment", "node": "study"}
    answer = hass.call("script", "llmqtt_ask", {**ask, "text": "The parcel arrived broken"}, response=True)
    assert answer["status"] == "ok" and answer["value"] == "negative" and answer["score"] == 0.9
    assert answer["text"] == "The parcel arrived broken"
    assert len(answer["id"]) == len("ha-script-") + 26  # the run's context id, a ULID: rendered, not empty
    chat = hass.call("script", "llmqtt_ask", {**ask, "task": "chat", "text": "hello there"}, response=True)
    assert chat["status"] == "ok" and chat["answer"] == "echo hello there"
    for text, code in (("x" * (MAX_TEXT + 1), "too_long"), ("   ", "bad_request")):
        started = time.monotonic()
        refused = hass.call("script", "llmqtt_ask", {**ask, "text": text}, response=True)
        elapsed = time.monotonic() - started
        assert refused["status"] == "error" and refused["error"]["code"] == code, refused
        assert set(refused) == {"id", "status", "error"}  # not the sensor's last good value
        assert elapsed < 1.0, f"the refusal took {elapsed:.2f}s to reach the script"


def test_availability_follows_the_daemon(hass, start_daemon):
    daemon = start_daemon(node_id="porch")
    hass.wait_state("sensor.llmqtt_porch_sentiment", lambda s: s["state"] != "unavailable")
    daemon.shutdown()
    hass.wait_state("sensor.llmqtt_porch_sentiment", lambda s: s["state"] == "unavailable")
    hass.wait_state("text.llmqtt_porch_sentiment_input", lambda s: s["state"] == "unavailable")
    hass.wait_state("binary_sensor.llmqtt_porch_status", lambda s: s["state"] == "off")  # Disconnected
    start_daemon(node_id="porch")
    hass.wait_state("sensor.llmqtt_porch_sentiment", lambda s: s["state"] != "unavailable")
    hass.wait_state("binary_sensor.llmqtt_porch_status", lambda s: s["state"] == "on")


def test_a_killed_daemon_turns_unavailable_through_its_last_will(hass, ha_broker, tmp_path):
    """`llmqtt run` as a process (fake engine), killed with SIGKILL: no goodbye, the broker's Last Will."""
    config = daemon_config(ha_broker, write_prompts(tmp_path / "prompts"), "garage", homeassistant={"enabled": True})
    config["mqtt"].update(username="llmqtt", password_file=str(ha_broker.password_file("llmqtt")))
    config["model"] = str(write_model_dir(tmp_path / "model"))
    daemon = DaemonProcess(tmp_path, config, fake_engine=True).start()
    try:
        hass.wait_state("sensor.llmqtt_garage_sentiment", lambda s: s["state"] == "unknown", timeout=60)
        daemon.kill()
        hass.wait_state("sensor.llmqtt_garage_sentiment", lambda s: s["state"] == "unavailable")
        hass.wait_state("binary_sensor.llmqtt_garage_status", lambda s: s["state"] == "off")
    finally:
        daemon.close()


def test_a_device_cannot_write_home_assistants_results(hass, ha_broker, start_daemon):
    """The ACL lets only HA write `<root>/ha/<task>/request`, and naming HA's old reply route proves nothing."""
    daemon = start_daemon(node_id="cellar")
    hass.wait_state("text.llmqtt_cellar_sentiment_input", lambda s: s["state"] != "unavailable")
    hass.call("text", "set_value", {"entity_id": "text.llmqtt_cellar_sentiment_input", "value": "great stuff"})
    before = hass.wait_state("sensor.llmqtt_cellar_sentiment", lambda s: s["state"] == "positive")
    observer = ha_broker.client_as("homeassistant").subscribe(f"{daemon.topics.root}/ha/#")
    assert [m.topic for m in observer.drain(quiet_s=0.5)] == [daemon.topics.ha_state("sentiment")]  # retained
    device = ha_broker.client_as("device")
    device.publish(daemon.topics.ha_request("sentiment"), {"id": "forged", "text": "awful"})
    device.publish(daemon.topics.request("sentiment"),
                   {"id": "forged2", "text": "awful", "reply_to": f"{daemon.topics.root}/reply/homeassistant/sentiment"})
    device.publish(daemon.topics.ha_state("sentiment"), {"value": "negative", "id": "forged3"}, retain=True)
    assert observer.drain(quiet_s=1.0) == []  # nothing reached HA's topics
    assert hass.state("sensor.llmqtt_cellar_sentiment")["attributes"]["id"] == before["attributes"]["id"]


def test_home_assistant_renders_every_template_we_ship(hass, repo_root):
    """Each template through HA's own engine (POST /api/template), with the variables it would see."""
    from llmqtt.tasks import load_tasks

    identity = ha.Identity("kitchen", "llmqtt/kitchen", "homeassistant", "m", "v")
    configs = ha.discovery_messages(identity, load_tasks([repo_root / "prompts"]))
    state = {"value": "negative", "id": "ha-1", "status": "ok", "text": "x", "score": 0.9}
    health = {"cpu_percent": 3.0, "memory": {"used_mb": 1.0}, "swap": {"used_mb": None}, "temperature_c": None,
              "queue_depth": 0, "tokens_per_s": None, "tasks": {}, "state": "online"}
    for topic, config in configs.items():
        for key in ("value_template", "command_template"):
            if key in config:
                value_json = {**health, **state} if "health" not in config.get("state_topic", "") else health
                shown = hass.render(config[key], value="He said \"hi\"", value_json=value_json)
                if key == "command_template":
                    assert json.loads(shown)["text"] == 'He said "hi"'
    deploy = repo_root / "deploy" / "homeassistant"
    found = templates_in(yaml.safe_load((deploy / "script.yaml").read_text()), "script")
    found += templates_in(yaml.safe_load((deploy / "automation.yaml").read_text()), "automations")
    variables = {"task": "sentiment", "text": "t", "node": "", "context": {"id": "01JD4X2V5W7K3M9Q8R6T0Y1ZAB"},
                 "root": "llmqtt/kitchen", "request_id": "ha-script-1", "value_json": state, "state": state,
                 "wait": {"trigger": {"payload_json": state}}, "trigger": {"payload": "p"},
                 "sentiment": {"status": "ok", "value": "negative", "score": 0.9}}
    for path, template in found:
        hass.render(template, **variables)  # HTTP 400 with HA's error for a template it refuses
    assert len(found) >= 10


def test_the_automation_example_runs_the_script(hass, ha_broker, start_daemon):
    start_daemon(node_id="kitchen")
    automations = {e: s for e, s in hass.states().items() if e.startswith("automation.")}
    assert len(automations) == 2 and all(s["state"] == "on" for s in automations.values())
    [doorbell] = [e for e, s in automations.items() if s["attributes"].get("id") == "llmqtt_doorbell_note_negative"]
    before = hass.state("script.llmqtt_ask")["attributes"].get("last_triggered")
    ha_broker.client_as("doorbell").publish("doorbell/note", "Nobody answered, awful service")
    hass.wait_state(doorbell, lambda s: s["attributes"].get("last_triggered") is not None)
    hass.wait_state("script.llmqtt_ask", lambda s: s["attributes"].get("last_triggered") != before)


def test_after_home_assistant_restarts_the_board_is_back_with_its_last_result(hass, start_daemon,
                                                                                caplog):
    daemon = start_daemon(node_id="attic")
    daemon.homeassistant.birth_delay_s = (0.1, 0.3)
    hass.wait_state("text.llmqtt_attic_sentiment_input", lambda s: s["state"] != "unavailable")
    hass.call("text", "set_value", {"entity_id": "text.llmqtt_attic_sentiment_input", "value": "I love the attic"})
    hass.wait_state("sensor.llmqtt_attic_sentiment", lambda s: s["state"] == "positive")
    hass.stop()
    with caplog.at_level("INFO", logger="llmqtt"):
        hass.start()
        # Restored as `unknown` at start, then the retained state arrives over MQTT.
        hass.wait_state("sensor.llmqtt_attic_sentiment", lambda s: s["state"] == "positive")
        hass.wait_state("binary_sensor.llmqtt_attic_status", lambda s: s["state"] == "on")
        deadline = time.monotonic() + 10
        while "Home Assistant is online" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    assert "Home Assistant is online" in caplog.text  # its birth made the daemon publish discovery again


@pytest.mark.real_model
def test_the_real_model_labels_what_is_typed_into_home_assistant(hass, start_daemon, demo_engine):
    start_daemon(node_id="demo", engine=demo_engine)
    hass.wait_state("text.llmqtt_demo_sentiment_input", lambda s: s["state"] != "unavailable", timeout=60)
    hass.call("text", "set_value", {"entity_id": "text.llmqtt_demo_sentiment_input",
                                    "value": "The kettle leaks again and support never answers. Terrible."})
    shown = hass.wait_state("sensor.llmqtt_demo_sentiment", lambda s: s["state"] not in ("unknown", "unavailable"),
                            timeout=60)
    assert shown["state"] == "negative" and shown["attributes"]["score"] > 0.5
    answer = hass.call("script", "llmqtt_ask", {"task": "sentiment", "node": "demo",
                                                "text": "I love how quiet and fast this new dishwasher is!"},
                       response=True)
    assert answer["status"] == "ok" and answer["value"] == "positive"
