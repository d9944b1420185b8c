from llmqtt.engine.types import Turn
from llmqtt.sessions import SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_history_accumulates_per_task_and_session():
    store = SessionStore(max_sessions=4, idle_ttl_s=60)
    store.append("chat", "a", "hi", "hello", max_turns=8)
    store.append("chat", "a", "how are you", "fine", max_turns=8)
    store.append("other", "a", "x", "y", max_turns=8)
    assert store.history("chat", "a") == [Turn("user", "hi"), Turn("assistant", "hello"),
                                          Turn("user", "how are you"), Turn("assistant", "fine")]
    assert store.history("other", "a") == [Turn("user", "x"), Turn("assistant", "y")]
    assert store.history("chat", "b") == []


def test_keeps_only_the_last_max_turns_pairs():
    store = SessionStore(max_sessions=4, idle_ttl_s=60)
    for i in range(5):
        store.append("chat", "s", f"u{i}", f"a{i}", max_turns=2)
    assert [t.content for t in store.history("chat", "s")] == ["u3", "a3", "u4", "a4"]
    store.append("chat", "z", "u", "a", max_turns=0)
    assert store.history("chat", "z") == []


def test_least_recently_used_session_is_evicted():
    store = SessionStore(max_sessions=2, idle_ttl_s=60)
    store.append("chat", "a", "1", "1", max_turns=4)
    store.append("chat", "b", "2", "2", max_turns=4)
    store.append("chat", "a", "3", "3", max_turns=4)  # a is now the most recent
    store.append("chat", "c", "4", "4", max_turns=4)
    assert store.history("chat", "b") == []
    assert len(store.history("chat", "a")) == 4
    assert len(store) == 2


def test_idle_sessions_expire():
    clock = Clock()
    store = SessionStore(max_sessions=8, idle_ttl_s=10, clock=clock)
    store.append("chat", "old", "u", "a", max_turns=4)
    clock.now = 6
    store.append("chat", "new", "u", "a", max_turns=4)
    clock.now = 11
    assert store.history("chat", "old") == []
    assert store.history("chat", "new") != []
    assert len(store) == 1
