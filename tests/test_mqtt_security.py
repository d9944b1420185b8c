"""TLS with a private CA and username + password file, against a mosquitto that requires both."""

from __future__ import annotations

import logging

import pytest
from broker import daemon_config, wait_online
from fake_engine import make_engine

from llmqtt.config import Config
from llmqtt.daemon import Daemon

pytestmark = pytest.mark.broker
PASSWORD = "s3cret pw"


def secure_daemon(broker, tmp_path, password: str) -> Daemon:
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(password + "\n", encoding="utf-8")
    mqtt = {"username": "llmqtt", "password_file": str(password_file), "tls": {"ca_file": str(broker.ca_file)}}
    config = Config.model_validate(daemon_config(broker, tmp_path / "prompts", mqtt=mqtt))
    return Daemon(config, make_engine(tmp_path / "prompts"), stop_grace_s=2)


def test_tls_and_password(secure_broker, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    daemon = secure_daemon(secure_broker, tmp_path, PASSWORD)
    daemon.start()
    try:
        client = secure_broker.client()
        wait_online(client, daemon.topics.root)
        client.subscribe(f"{daemon.topics.root}/response/#")
        client.publish(f"{daemon.topics.root}/request/sentiment", {"id": "tls", "text": "love"})
        assert client.expect_json(where=lambda r: r["id"] == "tls")["status"] == "ok"
    finally:
        daemon.shutdown()
    assert PASSWORD not in caplog.text and "s3cret" not in caplog.text


def test_wrong_password_is_refused_and_not_logged(secure_broker, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    daemon = secure_daemon(secure_broker, tmp_path, "wrong horse")
    daemon.start()
    try:
        assert not daemon.transport.connected.wait(1.5)
    finally:
        daemon.shutdown()
    assert "refused the connection" in caplog.text
    assert "wrong horse" not in caplog.text
