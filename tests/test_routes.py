"""Reply route policy (mqtt.routes): pure, no broker."""

from __future__ import annotations

import pytest

from llmqtt.config import Config, ConfigError, MqttConfig, load_config
from llmqtt.mqtt.routes import ReplyRoutes, is_topic_filter, matches, shorten
from llmqtt.mqtt.topics import Topics


def routes(reply_topics=None, **mqtt) -> ReplyRoutes:
    topics = Topics.from_config(MqttConfig(node_id="kitchen", **mqtt))
    return ReplyRoutes.build(topics, reply_topics)


@pytest.mark.parametrize("topic", [
    "llmqtt/kitchen/reply/dev1", "llmqtt/kitchen/reply/homeassistant/sentiment", "llmqtt/kitchen/response/chat",
])
def test_default_allows_the_own_reply_namespace_and_response_topics(topic):
    assert routes().refusal(topic) is None


@pytest.mark.parametrize("topic, why", [
    ("homeassistant/sensor/evil/x/config", "discovery prefix"),
    ("homeassistant/status", "discovery prefix"),
    ("llmqtt/other/status", "another node"),
    ("llmqtt/other/reply/x", "another node"),
    ("llmqtt/kitchen/status", "own topics"),
    ("llmqtt/kitchen/health", "own topics"),
    ("llmqtt/kitchen/ha/sentiment/state", "own topics"),
    ("llmqtt/kitchen/request/chat", "own topics"),
    ("llmqtt/kitchen/cancel/chat", "own topics"),
    ("$SYS/broker/x", "starts with $"),
    ("$share/g/llmqtt/kitchen/reply/x", "starts with $"),
    ("replies/me", "mqtt.reply_topics"),
    ("llmqtt/kitchen/response/chat/deeper", "mqtt.reply_topics"),
    ("llmqtt/kitchen/reply/+", "wildcards"),
    ("a/#", "wildcards"),
    ("", "empty"),
    ("x" * 65536, "65535"),
])
def test_refused_routes_say_why(topic, why):
    assert why in routes().refusal(topic)


def test_configured_filters_widen_the_list_but_never_past_the_fixed_refusals():
    wide = routes(["#"])
    assert wide.refusal("replies/me") is None
    for topic in ("homeassistant/status", "llmqtt/other/status", "llmqtt/kitchen/ha/x/state", "$SYS/x"):
        assert wide.refusal(topic) is not None, topic
    assert "mqtt.reply_topics" in routes([]).refusal("llmqtt/kitchen/reply/x")


def test_fleet_replies_are_allowed_under_the_fleet_topic():
    fleet = routes(fleet={"enabled": True, "topic": "llmqtt/fleet"})
    assert fleet.refusal("llmqtt/fleet/reply/dev") is None
    assert fleet.refusal("llmqtt/fleet/response/chat") is None
    assert "own topics" in fleet.refusal("llmqtt/fleet/request/chat")
    assert "another node" in routes().refusal("llmqtt/fleet/reply/dev")  # fleet mode off: not ours


def test_filter_matching():
    assert matches("a/#", "a") and matches("a/#", "a/b/c") and matches("a/+/c", "a/b/c")
    assert not matches("a/+", "a/b/c") and not matches("#", "$SYS/x") and not matches("a/b", "a")
    assert is_topic_filter("a/+/b/#") and not is_topic_filter("a/b#") and not is_topic_filter("a/#/b")
    assert not is_topic_filter("a+/b") and not is_topic_filter("")


def test_config_rejects_bad_filters(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mqtt: {reply_topics: ['ok/#', 'bad#']}\n")
    with pytest.raises(ConfigError, match="mqtt.reply_topics"):
        load_config(path)
    assert Config.model_validate({"mqtt": {"reply_topics": ["a/+/b"]}}).mqtt.reply_topics == ["a/+/b"]


def test_long_topics_are_shortened_for_logs():
    assert shorten("a/b") == "a/b"
    assert shorten("x" * 65535).endswith("(65535 bytes)") and len(shorten("x" * 65535)) < 120
