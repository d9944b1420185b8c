"""Extensions start and stop each inside their own error guard."""

from __future__ import annotations

import logging

from llmqtt.extensions.base import start_all, stop_all


class Ext:
    def __init__(self, name: str, log: list, fail_start: bool = False, fail_stop: bool = False):
        self.name, self.log, self.fail_start, self.fail_stop = name, log, fail_start, fail_stop

    def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("boom")
        self.log.append(f"start {self.name}")

    def stop(self) -> None:
        if self.fail_stop:
            raise RuntimeError("boom")
        self.log.append(f"stop {self.name}")


def test_a_failing_extension_does_not_stop_the_others(caplog):
    log: list[str] = []
    exts = [Ext("a", log), Ext("b", log, fail_start=True), Ext("c", log, fail_stop=True), Ext("d", log)]
    with caplog.at_level(logging.ERROR):
        started = start_all(exts)
        stop_all(started)
    assert [e.name for e in started] == ["a", "c", "d"]
    assert log == ["start a", "start c", "start d", "stop d", "stop a"]
    assert "extension b failed to start" in caplog.text and "extension c failed to stop" in caplog.text
