"""Logging set-up: text / JSON lines / journald, the per-request line, redaction, JOURNAL_STREAM detection."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
from needs import missing

from llmqtt import logs
from llmqtt.config import LoggingConfig
from llmqtt.logs import log_request, redact, setup_logging, stderr_is_journal

log = logging.getLogger("llmqtt.test")


@pytest.fixture(autouse=True)
def restore_root_logger():
    """setup_logging changes process-wide state; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def journal_handler_available() -> None:
    if logs._journal_handler_class() is None:
        missing("systemd-python")


def our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, logs._OUR_HANDLER, False)]


def test_text_output_honours_the_level() -> None:
    out = io.StringIO()
    assert setup_logging(LoggingConfig(format="text", level="INFO"), stream=out) == "text"

    log.debug("not shown")
    log.info("hello %s", "world")

    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("INFO    llmqtt.test: hello world")


def test_debug_level() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(format="text", level="DEBUG"), stream=out)
    log.debug("details")
    assert "DEBUG   llmqtt.test: details" in out.getvalue()


def test_setting_up_twice_does_not_duplicate_output() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(format="text"), stream=out)
    setup_logging(LoggingConfig(format="text"), stream=out)

    log.info("once")

    assert len(our_handlers()) == 1
    assert out.getvalue().count("once") == 1


def test_json_lines() -> None:
    out = io.StringIO()
    assert setup_logging(LoggingConfig(format="json"), stream=out) == "json"

    log.warning("disk %s", "full", extra={"FREE_MB": 12})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")

    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "msg", "free_mb")} == {
        "level": "WARNING", "logger": "llmqtt.test", "msg": "disk full", "free_mb": 12}
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exc"]


def test_request_line_in_text() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(format="text"), stream=out)

    log_request(log, request_id="r-1", task="summarize", status="ok", latency_ms=812.44, queue_ms=3,
                new_tokens=12, client="kitchen panel")

    line = out.getvalue().strip()
    assert " INFO " in line
    assert line.endswith('llmqtt.test: request request_id=r-1 task=summarize status=ok latency_ms=812.4 '
                         'queue_ms=3.0 new_tokens=12 client="kitchen panel"')


def test_failed_request_is_a_warning_and_absent_values_are_left_out() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(format="text"), stream=out)

    log_request(log, request_id=None, task="classify", status="error", latency_ms=5, error="unknown_task")

    line = out.getvalue().strip()
    assert " WARNING " in line
    assert line.endswith("request task=classify status=error latency_ms=5.0 error=unknown_task")


def test_request_fields_in_json() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(format="json"), stream=out)

    log_request(log, request_id="r-1", task="summarize", status="ok", latency_ms=812.44, queue_ms=3,
                new_tokens=12)

    line = json.loads(out.getvalue())
    assert {k: line[k] for k in ("request_id", "task", "status", "latency_ms", "queue_ms", "new_tokens")} == {
        "request_id": "r-1", "task": "summarize", "status": "ok", "latency_ms": 812.4, "queue_ms": 3.0,
        "new_tokens": 12}


def test_request_fields_become_journal_fields() -> None:
    journal_handler_available()
    assert setup_logging(LoggingConfig(format="journal")) == "journal"
    (handler,) = our_handlers()
    sent: list[tuple[str, dict]] = []
    handler.send = lambda MESSAGE, **fields: sent.append((MESSAGE, fields))  # instead of journald's socket

    log_request(log, request_id="r-1", task="summarize", status="ok", latency_ms=812.44, queue_ms=3,
                new_tokens=12, message="reserved name")

    ((message, fields),) = sent
    assert message.startswith("llmqtt.test: request request_id=r-1 task=summarize status=ok")
    assert {k: fields[k] for k in ("REQUEST_ID", "TASK", "STATUS", "LATENCY_MS", "QUEUE_MS", "NEW_TOKENS")} == {
        "REQUEST_ID": "r-1", "TASK": "summarize", "STATUS": "ok", "LATENCY_MS": 812.4, "QUEUE_MS": 3.0,
        "NEW_TOKENS": 12}
    assert fields["LLMQTT_MESSAGE"] == "reserved name"  # MESSAGE itself belongs to journald
    assert fields["SYSLOG_IDENTIFIER"] == "llmqtt"
    assert fields["PRIORITY"] == "6"
    assert "CODE_ARGS" not in fields


def test_journal_without_systemd_python_falls_back_to_text_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_journal_handler_class", lambda: None)
    out = io.StringIO()

    assert setup_logging(LoggingConfig(format="journal"), stream=out) == "text"
    log.info("still logged")

    text = out.getvalue()
    assert text.count("systemd-python is not installed") == 1
    assert "llmqtt.test: still logged" in text


def journal_stream_for(file: io.IOBase) -> str:
    info = os.fstat(file.fileno())
    return f"{info.st_dev}:{info.st_ino}"


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        assert stderr_is_journal(journal, {"JOURNAL_STREAM": journal_stream_for(journal)})
        assert not stderr_is_journal(other, {"JOURNAL_STREAM": journal_stream_for(journal)})
        assert not stderr_is_journal(journal, {})
        assert not stderr_is_journal(journal, {"JOURNAL_STREAM": "garbage"})
    assert not stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})  # no file behind it


def test_auto_picks_the_journal_when_stderr_is_the_journal(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    journal_handler_available()
    with open(tmp_path / "journal", "w") as journal:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_for(journal))
        assert setup_logging(LoggingConfig(format="auto"), stream=journal) == "journal"
        monkeypatch.delenv("JOURNAL_STREAM")
        assert setup_logging(LoggingConfig(format="auto"), stream=journal) == "text"


def test_auto_on_the_journal_without_systemd_python_writes_priority_prefixes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_journal_handler_class", lambda: None)
    path = tmp_path / "journal"
    with open(path, "w") as journal:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_for(journal))
        assert setup_logging(LoggingConfig(format="auto"), stream=journal) == "text"
        log.info("hello")
        log.warning("careful")

    # journald adds the time itself and reads `<N>` as the syslog priority.
    assert path.read_text().splitlines() == ["<6>llmqtt.test: hello", "<4>llmqtt.test: careful"]


@pytest.mark.parametrize(("text", "expected"), [
    ("password=hunter2", "password=***"),
    ("login user=ha PASSWORD: hunter2 ok", "login user=ha PASSWORD: *** ok"),
    ('{"password": "hunter2", "user": "ha"}', '{"password": "***", "user": "ha"}'),
    ("passwd='hunter 2'", "passwd='***'"),
    ("api_key=abc123&x=1", "api_key=***&x=1"),
    ("mqtt://ha:hunter2@broker:1883/x", "mqtt://ha:***@broker:1883/x"),
    # Not secrets: a path to one, token counts, plain URLs.
    ("password_file=/etc/llmqtt/mqtt-password", "password_file=/etc/llmqtt/mqtt-password"),
    ("max_new_tokens=64 tokens: 12", "max_new_tokens=64 tokens: 12"),
    ("http://broker:1883/x", "http://broker:1883/x"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_secrets_never_reach_the_output() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(format="json"), stream=out)

    log.info("connecting with password=%s", "hunter2")
    try:
        raise ConnectionError("auth failed for mqtt://ha:hunter2@broker")
    except ConnectionError:
        log.exception("connect")

    assert "hunter2" not in out.getvalue()
    assert "password=***" in out.getvalue()
