"""End to end with the real demo model: `llmqtt run` as a process, a real mosquitto, MQTT v5 replies."""

from __future__ import annotations

import pytest
from broker import DaemonProcess, daemon_config, wait_online

pytestmark = [pytest.mark.real_model, pytest.mark.broker, pytest.mark.slow]

LOAD_S = 240.0  # load + prefix caches + warm-up of the 0.5B model on a busy 2-core machine


def test_demo_model_answers_over_mqtt(broker, tmp_path, demo_model, repo_root):
    config = daemon_config(broker, repo_root / "prompts", node_id="e2e")
    config["model"] = "demo"
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        client = broker.client()
        status = wait_online(client, daemon.root, timeout=LOAD_S)
        assert status["model"].startswith("Qwen2.5-Coder-0.5B") and status["dtype"] == "float32+int8"  # quantize: auto on x86

        client.subscribe(f"{daemon.root}/reply/#", f"{daemon.root}/response/#")
        client.publish(f"{daemon.root}/request/sentiment", {"id": "s1", "text": "这家餐厅太难吃了，服务也很差。"},
                       response_topic=f"{daemon.root}/reply/s", correlation_data=b"\x01corr")
        reply = client.expect(f"{daemon.root}/reply/s", timeout=60)
        assert reply.correlation_data == b"\x01corr"
        body = reply.json()
        assert body["status"] == "ok" and body["id"] == "s1", body
        assert body["result"]["label"] == "negative" and body["result"]["score"] > 0.7

        client.publish(f"{daemon.root}/request/chat",
                       {"id": "c1", "text": "What is the capital of Japan? One short sentence.", "stream": True,
                        "max_new_tokens": 30})
        deltas = []
        while True:
            msg = client.expect_json(f"{daemon.root}/response/chat", timeout=120, where=lambda m: m["id"] == "c1")
            if "seq" not in msg:
                break
            assert msg["seq"] == len(deltas)
            deltas.append(msg["delta"])
        assert msg["status"] == "ok", msg
        assert "Tokyo" in msg["result"]["text"]
        assert "".join(deltas) == msg["result"]["text"]
        assert "<|im_" not in msg["result"]["text"]

        assert daemon.terminate(timeout=60) == 0
        offline = client.expect_json(f"{daemon.root}/status", where=lambda m: m["state"] == "offline")
        assert offline["state"] == "offline"
    finally:
        daemon.close()
    assert "Traceback" not in daemon.log()
