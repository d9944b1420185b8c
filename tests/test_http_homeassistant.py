"""A real Home Assistant (tests/ha) with its built-in Ollama integration pointed at llmqtt's HTTP API, as the
README tells a person to set it up: add the integration with the board's URL, pick `chat:latest`, and talk to
the conversation agent. The daemon side runs the fake engine (echo answers), so what is checked is the
protocol: HA lists the models, streams the answer, and sends the whole conversation on the next turn."""

from __future__ import annotations

import pytest
from test_http import Server

pytestmark = [pytest.mark.homeassistant, pytest.mark.slow]


@pytest.fixture
def board(tmp_path):
    server = Server(tmp_path, max_text_chars=4000, max_body_bytes=1 << 20)
    yield server
    server.close()


def test_home_assistant_ollama_conversation_agent_is_answered_by_the_board(home_assistant, board):
    hass = home_assistant
    form = hass.config_flow("ollama", {"url": board.url})
    assert form["type"] == "form" and form["step_id"] == "user", form  # now it offers the board's models
    offered = next(field for field in form["data_schema"] if field["name"] == "model")
    downloaded = [o["value"] for o in offered["selector"]["select"]["options"] if "downloaded" in o["label"]]
    assert downloaded == ["chat:latest"], offered  # the generate tasks, as "downloaded" models
    entry = hass.post(f"/api/config/config_entries/flow/{form['flow_id']}", {"model": "chat:latest"})
    assert entry["type"] == "create_entry", entry
    hass.wait_entry_loaded("ollama")
    agent = next(entity for entity in hass.states() if entity.startswith("conversation.")
                 and entity != "conversation.home_assistant")

    first = hass.call("conversation", "process", {"text": "turn on the hall light", "agent_id": agent},
                      response=True)
    assert first["response"]["speech"]["plain"]["speech"] == "echo turn on the hall light", first
    system = board.engine.options[-1].system
    assert system and "Current time is" in system  # HA's own system prompt replaced the task's
    second = hass.call("conversation", "process", {"text": "and the kitchen", "agent_id": agent,
                                                   "conversation_id": first["conversation_id"]}, response=True)
    assert second["response"]["speech"]["plain"]["speech"] == "echo and the kitchen"
    assert [(t.role, t.content) for t in board.engine.histories[-1]] == [
        ("user", "turn on the hall light"), ("assistant", "echo turn on the hall light")]
