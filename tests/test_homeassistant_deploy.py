"""deploy/homeassistant: the script's steps played against a real broker and daemon, as Home Assistant would
run them (jinja2 with HA's `to_json` and `now()`; the MQTT trigger matches when its value_template, rendered
on a message, equals its rendered payload)."""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import pytest
import yaml

DEPLOY = "deploy/homeassistant"


def render(template: str, **variables) -> str:
    env = jinja2.Environment()
    env.globals["now"] = datetime.now
    env.filters["to_json"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env.from_string(template).render(**variables)


@pytest.fixture
def script(repo_root) -> dict:
    return yaml.safe_load((repo_root / DEPLOY / "script.yaml").read_text(encoding="utf-8"))["llmqtt_ask"]


def triggered(trigger: dict, variables: dict, payload: bytes) -> bool:
    """HA's MQTT trigger: value_template over the message, compared with the rendered payload."""
    try:
        value_json = json.loads(payload)
    except ValueError:
        return False
    return render(trigger["value_template"], value_json=value_json) == render(trigger["payload"], **variables)


@pytest.mark.broker
def test_the_script_gets_its_answer_even_when_it_arrived_before_the_wait(broker, start_daemon, script):
    daemon = start_daemon(node_id="kitchen", homeassistant={"enabled": True})
    steps = script["sequence"]
    variables = {"task": "sentiment", "text": 'The "new" kettle leaks', "node": ""}
    variables.update({k: render(v, **variables) for k, v in steps[0]["variables"].items()})
    assert variables["root"] == daemon.topics.root
    publish = steps[1]["data"]
    client = broker.client().subscribe(f"{daemon.topics.root}/reply/#")
    client.publish(render(publish["topic"], **variables), render(publish["payload"], **variables))
    client.expect_json(where=lambda r: r.get("id") == variables["request_id"])  # answered before the wait below
    state_trigger, reply_trigger = steps[2]["wait_for_trigger"]
    late = broker.client().subscribe(render(state_trigger["topic"], **variables))
    [answer] = [m for m in late.drain(quiet_s=0.3) if triggered(state_trigger, variables, m.payload)]
    response = json.loads(answer.payload)  # what `stop: ... response_variable: answer` returns
    assert response["status"] == "ok" and response["value"] == "negative" and response["text"] == variables["text"]
    assert render(reply_trigger["topic"], **variables) == f"{daemon.topics.root}/reply/homeassistant/sentiment"


@pytest.mark.broker
def test_the_scripts_reply_trigger_catches_a_refused_request(broker, start_daemon, script):
    daemon = start_daemon(node_id="kitchen", homeassistant={"enabled": True})
    reply_trigger = script["sequence"][2]["wait_for_trigger"][1]
    variables = {"task": "sentiment", "request_id": "r1", "root": daemon.topics.root}
    client = broker.client().subscribe(render(reply_trigger["topic"], **variables))
    client.publish(f"{daemon.topics.root}/request/sentiment",
                   {"id": "r1", "text": "   ", "reply_to": render(reply_trigger["topic"], **variables)})
    refused = client.expect()
    assert triggered(reply_trigger, variables, refused.payload) and json.loads(refused.payload)["status"] == "error"
    ok = {"id": "r1", "task": "sentiment", "status": "ok", "result": {}}
    assert not triggered(reply_trigger, variables, json.dumps(ok).encode())  # ok answers come from the state


def test_the_script_returns_a_mapping_on_timeout(script):
    on_timeout = script["sequence"][3]
    assert on_timeout["if"] == "{{ wait.trigger is none }}"
    assert on_timeout["then"][1] == {"stop": "llmqtt did not answer", "response_variable": "answer"}
    assert set(on_timeout["then"][0]["variables"]["answer"]) == {"id", "status", "error"}
    assert script["sequence"][-1] == {"stop": "llmqtt answered", "response_variable": "answer"}


def test_the_automations_use_the_script_response_and_the_sensor(repo_root):
    automations = yaml.safe_load((repo_root / DEPLOY / "automation.yaml").read_text(encoding="utf-8"))
    ask, sensor = automations
    assert ask["actions"][0]["action"] == "script.llmqtt_ask" and ask["actions"][0]["response_variable"] == "sentiment"
    condition = ask["actions"][1]["value_template"]
    negative = {"status": "ok", "value": "negative", "score": 0.93}
    assert render(condition, sentiment=negative) == "True"
    assert render(condition, sentiment={"status": "error", "error": {"code": "timeout"}}) == "False"
    assert sensor["triggers"][0]["entity_id"] == "sensor.llmqtt_kitchen_sentiment"
