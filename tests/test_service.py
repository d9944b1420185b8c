from __future__ import annotations

import threading
import time

import pytest
from polling import wait_until
from fake_engine import make_engine

from llmqtt.service import Job, Outcome, Service, Submitted
from llmqtt.sessions import SessionStore

WAIT = 10


class Sink:
    def __init__(self) -> None:
        self.chunks: list[tuple[int, str]] = []
        self.outcomes: list[Outcome] = []
        self.done = threading.Event()

    def chunk(self, seq: int, delta: str) -> None:
        self.chunks.append((seq, delta))

    def finish(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.done.set()

    def wait(self) -> Outcome:
        assert self.done.wait(WAIT), "no answer"
        return self.outcomes[-1]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(tmp_path):
    return make_engine(tmp_path / "prompts")


def make_service(engine, **kwargs) -> Service:
    kwargs.setdefault("sessions", SessionStore(8, 60))
    return Service(engine, **kwargs)


@pytest.fixture
def service(engine):
    svc = make_service(engine)
    yield svc
    svc.stop(5)


def job(task: str, id, text: str = "I love it", **kwargs) -> tuple[Job, Sink]:
    sink = Sink()
    return Job(task=task, id=id, text=text, sink=sink, **kwargs), sink


def test_classify_answers_label_and_scores(service):
    service.start()
    j, sink = job("sentiment", "a1")
    assert service.submit(j) is Submitted.QUEUED
    out = sink.wait()
    assert out.ok and out.id == "a1" and out.task == "sentiment"
    assert out.result["label"] == "positive"
    assert set(out.result["scores"]) == {"positive", "negative"}
    assert out.latency_ms >= out.queue_ms >= 0


def test_waiting_classifications_are_batched_per_task(engine):
    svc = make_service(engine, max_batch=3)
    sinks = []
    for i in range(4):
        j, s = job("sentiment", i, "great" if i % 2 else "bad")
        svc.submit(j)
        sinks.append(s)
    j, s = job("topic", "t", "rain today")
    svc.submit(j)
    sinks.append(s)
    svc.start()
    outs = [s.wait() for s in sinks]
    svc.stop(5)
    assert engine.batches == [("sentiment", 3), ("sentiment", 1), ("topic", 1)]
    assert [o.result["label"] for o in outs] == ["negative", "positive", "negative", "positive", "weather"]


def test_classification_goes_ahead_of_generation(engine):
    svc = make_service(engine)
    order = []
    gen, gen_sink = job("chat", "g", "hello there")
    cls, cls_sink = job("sentiment", "c")
    gen_sink.finish = lambda o: order.append("chat") or Sink.finish(gen_sink, o)
    cls_sink.finish = lambda o: order.append("sentiment") or Sink.finish(cls_sink, o)
    svc.submit(gen)
    svc.submit(cls)
    svc.start()
    gen_sink.wait()
    cls_sink.wait()
    svc.stop(5)
    assert order == ["sentiment", "chat"]


def test_full_queue_is_answered_busy_at_once_with_a_retry_hint(engine):
    svc = make_service(engine, queue_size=2)
    for i in range(2):
        assert svc.submit(job("sentiment", i)[0]) is Submitted.QUEUED
    j, sink = job("sentiment", "late")
    assert svc.submit(j) is Submitted.REJECTED
    out = sink.wait()
    assert out.error.code == "busy" and out.error.retry_after_ms >= 100
    # busy is transient: the same id is accepted once there is room
    svc.start()
    j2, sink2 = job("sentiment", "late")
    wait_until(lambda: svc.queue_depth() == 0)
    assert svc.submit(j2) is Submitted.QUEUED
    assert sink2.wait().ok
    svc.stop(5)


def test_expired_deadline_is_answered_without_running(engine):
    clock = Clock()
    svc = make_service(engine, clock=clock)
    j, sink = job("sentiment", "x", deadline_ms=100)
    g, gsink = job("chat", "y", deadline_ms=100)
    svc.submit(j)
    svc.submit(g)
    clock.now += 1.0
    svc.start()
    assert sink.wait().error.code == "expired"
    assert gsink.wait().error.code == "expired"
    svc.stop(5)
    assert engine.batches == [] and engine.histories == []


def test_default_deadline_applies(engine):
    clock = Clock()
    svc = make_service(engine, clock=clock, default_deadline_ms=50)
    j, sink = job("sentiment", "x")
    svc.submit(j)
    clock.now += 0.2
    svc.start()
    assert sink.wait().error.code == "expired"
    svc.stop(5)


def test_unknown_task(service):
    j, sink = job("nope", 1)
    assert service.submit(j) is Submitted.REJECTED
    assert sink.wait().error.code == "unknown_task"


def test_duplicate_id_is_answered_once_computed(engine):
    svc = make_service(engine)
    first, s1 = job("sentiment", "dup")
    second, s2 = job("sentiment", "dup")
    assert svc.submit(first) is Submitted.QUEUED
    assert svc.submit(second) is Submitted.DUPLICATE  # waits for the queued one
    svc.start()
    o1, o2 = s1.wait(), s2.wait()
    assert o1.result == o2.result and not o1.cached and o2.cached
    third, s3 = job("sentiment", "dup")
    assert svc.submit(third) is Submitted.DUPLICATE  # answered from the cache
    assert s3.wait().cached
    svc.stop(5)
    assert engine.batches == [("sentiment", 1)]
    # ids are per task
    other, s4 = job("topic", "dup", "rain")
    assert Service(engine, sessions=SessionStore(2, 60)).submit(other) is Submitted.QUEUED


def test_a_reused_id_with_a_different_request_runs_as_itself(engine):
    """Devices number their requests 1, 2, 3...: the same id from another client (another fingerprint)
    must get its own answer, never the first client's, whether the first is still waiting or answered."""
    svc = make_service(engine)
    a, sink_a = job("chat", 7, "my door code is 4711", fingerprint=b"client-a")
    b, sink_b = job("chat", 7, "what time is it", fingerprint=b"client-b")
    assert svc.submit(a) is Submitted.QUEUED
    assert svc.submit(b) is Submitted.QUEUED  # not folded into a's answer
    svc.start()
    assert sink_a.wait().result["text"] == "echo my door code is 4711"
    assert sink_b.wait().result["text"] == "echo what time is it"
    c, sink_c = job("chat", 7, "hello", fingerprint=b"client-c")
    assert svc.submit(c) is Submitted.QUEUED  # after both were answered: still its own
    assert sink_c.wait().result["text"] == "echo hello" and not sink_c.wait().cached
    redelivered, sink_r = job("chat", 7, "my door code is 4711", fingerprint=b"client-a")
    assert svc.submit(redelivered) is Submitted.DUPLICATE and sink_r.wait().cached
    svc.stop(5)
    assert len(engine.histories) == 3


def test_busy_retry_hint_follows_the_measured_drain_rate(engine):
    """The hint is the time the waiting queue takes at the rate the worker measured (batches count), so it
    matches the drain that follows. (The old per-job mean, blind to batching, said 33 s for a 3.6 s drain.)"""
    engine.classify_delay_s = 0.2  # per batch, whatever its size
    svc = make_service(engine, queue_size=8, max_batch=8)
    svc.start()
    first = [job("sentiment", f"warm{i}") for i in range(8)]
    for j, _ in first:
        svc.submit(j)
    for _, sink in first:
        sink.wait()
    engine.gate = threading.Event()  # hold the worker while the queue fills
    held, _ = job("sentiment", "held")
    svc.submit(held)
    wait_until(lambda: svc.queue_depth() == 0)
    waiting = [job("sentiment", f"w{i}") for i in range(8)]
    for j, _ in waiting:
        svc.submit(j)
    late, late_sink = job("sentiment", "late")
    assert svc.submit(late) is Submitted.REJECTED
    hint_s = late_sink.wait().error.retry_after_ms / 1000
    released = time.monotonic()
    engine.gate.set()
    for _, sink in waiting:
        sink.wait()
    drained_s = time.monotonic() - released  # the held batch, then the 8 waiting as one batch
    svc.stop(5)
    assert drained_s / 3 <= hint_s <= drained_s * 3, (hint_s, drained_s)


def test_dedup_cache_is_bounded(engine):
    svc = make_service(engine, dedup_size=1)
    svc.start()
    for i in ("a", "b"):
        j, s = job("sentiment", i)
        svc.submit(j)
        s.wait()
    j, s = job("sentiment", "a")
    assert svc.submit(j) is Submitted.QUEUED
    s.wait()
    svc.stop(5)


def test_streaming_chunks_are_numbered_and_add_up(service):
    service.start()
    j, sink = job("chat", "s", "tell me a story", stream=True)
    service.submit(j)
    out = sink.wait()
    assert out.ok and out.result["finish_reason"] == "stop"
    assert [seq for seq, _ in sink.chunks] == list(range(len(sink.chunks)))
    assert "".join(d for _, d in sink.chunks) == out.result["text"] == "echo tell me a story"
    assert out.result["tokens"] == 5


def test_the_worker_frees_its_engine_threads_once_out_of_work_not_between_steps(engine, service):
    """engine.idle() (its OpenMP threads, engine/openmp.py) when nothing is queued or generating: a
    classification and a chat queued together run as several steps, then one idle call, on the worker."""
    engine.gate = threading.Event()
    service.start()
    (chat, chat_sink), (label, label_sink) = job("chat", "c", "tell me a story", stream=True), job("sentiment", "s")
    service.submit(chat)
    service.submit(label)
    engine.gate.set()
    assert chat_sink.wait().ok and label_sink.wait().ok
    wait_until(lambda: engine.idle_threads)
    assert len(engine.steps) >= 3 and engine.idle_threads == ["llmqtt-worker"]
    j, sink = job("sentiment", "s2")
    service.submit(j)
    assert sink.wait().ok
    wait_until(lambda: len(engine.idle_threads) == 2)  # idle again after the next piece of work


def test_no_chunks_without_stream_and_max_new_tokens(service):
    service.start()
    j, sink = job("chat", "s", "one two three four", max_new_tokens=2)
    service.submit(j)
    out = sink.wait()
    assert sink.chunks == [] and out.result["text"] == "echo one" and out.result["tokens"] == 2


def test_session_history_is_kept_and_passed(engine, service):
    service.start()
    for i, text in enumerate(["hi", "again"]):
        j, sink = job("chat", i, text, session="kitchen")
        service.submit(j)
        sink.wait()
    j, sink = job("chat", 9, "other", session="garage")
    service.submit(j)
    sink.wait()
    assert engine.histories[0] == []
    assert [t.content for t in engine.histories[1]] == ["hi", "echo hi"]
    assert engine.histories[2] == []


def test_cancel_queued_job(engine):
    svc = make_service(engine)
    j, sink = job("chat", "c1", "a b c")
    svc.submit(j)
    assert svc.cancel("chat", "c1") is True
    assert sink.wait().error.code == "cancelled"
    assert svc.cancel("chat", "unknown") is False
    assert svc.queue_depth() == 0


def test_cancel_running_generation_returns_partial_text(engine):
    engine.gate = threading.Event()
    svc = make_service(engine)
    svc.start()
    j, sink = job("chat", "c2", "a b c d e f", stream=True)
    first_chunk = threading.Event()
    sink.chunk = lambda seq, d: (Sink.chunk(sink, seq, d), first_chunk.set(), engine.gate.clear())
    svc.submit(j)
    engine.gate.set()
    assert first_chunk.wait(WAIT)
    assert svc.cancel("chat", "c2") is True
    engine.gate.set()
    out = sink.wait()
    svc.stop(5)
    assert out.error.code == "cancelled"
    assert out.error.partial["finish_reason"] == "cancelled"
    assert out.error.partial["text"] == "echo"


def test_invalid_text_fails_only_its_own_batch_item(engine):
    svc = make_service(engine)
    bad, bad_sink = job("sentiment", "bad", "<|im_start|>system")
    good, good_sink = job("sentiment", "good", "I love it")
    svc.submit(bad)
    svc.submit(good)
    svc.start()
    assert bad_sink.wait().error.code == "invalid_text"
    assert good_sink.wait().result["label"] == "positive"
    g, gs = job("chat", "g", "<|im_start|>user")
    svc.submit(g)
    assert gs.wait().error.code == "invalid_text"
    svc.stop(5)


def test_engine_crash_is_internal_and_worker_survives(engine, service):
    engine.classify = lambda task, texts: 1 / 0
    service.start()
    j, sink = job("sentiment", 1)
    service.submit(j)
    assert sink.wait().error.code == "internal"
    j, sink = job("chat", 2, "still here")
    service.submit(j)
    assert sink.wait().ok


class AlwaysLow:
    """A MemoryGuard stand-in that always reports low memory."""

    def allow_generation(self) -> bool:
        return False

    def batch_limit(self, max_batch: int) -> int:
        return max(1, max_batch // 2)


def test_low_memory_halves_classification_batches(engine):
    svc = make_service(engine, max_batch=4, memory=AlwaysLow())
    sinks = []
    for i in range(4):
        j, s = job("sentiment", i, "great")
        svc.submit(j)
        sinks.append(s)
    svc.start()
    assert all(s.wait().ok for s in sinks)
    svc.stop(5)
    assert engine.batches == [("sentiment", 2), ("sentiment", 2)]


def test_low_memory_refuses_generation(engine):
    svc = make_service(engine, memory=AlwaysLow())
    svc.start()
    j, sink = job("chat", 1, "hello")
    svc.submit(j)
    assert sink.wait().error.code == "low_memory"
    j, sink = job("sentiment", 2)
    svc.submit(j)
    assert sink.wait().ok
    svc.stop(5)


def test_stop_drops_queued_jobs_unanswered(engine):
    svc = make_service(engine)
    j, sink = job("sentiment", 1)
    svc.submit(j)
    assert svc.stop(5) is True
    assert sink.outcomes == []
    assert svc.submit(job("sentiment", 2)[0]) is Submitted.STOPPED


def test_stop_gives_up_on_a_stuck_job_and_drops_its_answer(engine):
    engine.gate = threading.Event()
    svc = make_service(engine)
    svc.start()
    j, sink = job("chat", 1, "a b c")
    svc.submit(j)
    wait_until(lambda: engine.histories)  # the worker is inside generate()
    assert svc.stop(0.2) is False
    engine.gate.set()
    svc._worker.join(WAIT)
    assert sink.outcomes == []


def test_stats_and_observer(engine):
    seen = []
    svc = make_service(engine, observer=lambda j, o: seen.append((j.id, o.ok)))
    svc.start()
    for i in range(3):
        j, sink = job("sentiment", i)
        svc.submit(j)
        sink.wait()
    j, sink = job("nope", "x")
    svc.submit(j)
    j, sink = job("chat", "g", "a b c d")
    svc.submit(j)
    sink.wait()
    svc.stop(5)
    snap = svc.stats.snapshot()
    assert snap["ok"] == 4 and snap["error"] == 1 and snap["errors_by_code"] == {"unknown_task": 1}
    assert snap["tasks"]["sentiment"]["ok"] == 3 and snap["tasks"]["sentiment"]["p95_ms"] is not None
    assert seen[:3] == [(0, True), (1, True), (2, True)] and ("x", False) in seen


# -- the step loop: generations side by side, classification between their tokens --------------------


def test_a_classification_during_a_long_generation_is_answered_before_it_ends(tmp_path):
    engine = make_engine(tmp_path / "prompts", token_delay_s=0.01)
    svc = make_service(engine)
    gen, gen_sink = job("chat", "g", " ".join(f"w{i}" for i in range(30)), stream=True)
    cls, cls_sink = job("sentiment", "c", "great")
    chunks_at_answer = []
    cls_sink.finish = lambda o: (chunks_at_answer.append(len(gen_sink.chunks)), Sink.finish(cls_sink, o))

    def chunk(seq, delta):
        Sink.chunk(gen_sink, seq, delta)
        if seq == 2:  # the chat is streaming: a classification arrives
            svc.submit(cls)

    gen_sink.chunk = chunk
    svc.submit(gen)
    svc.start()
    assert cls_sink.wait().ok and gen_sink.wait().ok
    svc.stop(5)
    assert chunks_at_answer == [3]  # answered right after the step in flight, not after the chat's 31 chunks
    assert len(gen_sink.chunks) == 31


def test_concurrent_generations_share_each_step_up_to_the_bound(tmp_path):
    engine = make_engine(tmp_path / "prompts", token_delay_s=0.01)
    svc = make_service(engine, max_generations=2)
    sinks = []
    for i, n in enumerate((6, 6, 3)):
        j, sink = job("chat", i, " ".join(f"{i}w{k}" for k in range(n)), stream=True)
        svc.submit(j)
        sinks.append(sink)
    svc.start()
    outcomes = [s.wait() for s in sinks]
    svc.stop(5)
    assert all(o.ok for o in outcomes)
    assert engine.starts == [2, 1]  # two prompts together, the third once a place was free
    assert max(engine.steps) == 2 and engine.steps.count(2) == 6  # the first two stepped together all the way
    for i, (sink, outcome) in enumerate(zip(sinks, outcomes)):  # each stream complete and in order
        assert [seq for seq, _ in sink.chunks] == list(range(len(sink.chunks)))
        assert "".join(d for _, d in sink.chunks) == outcome.result["text"]
        assert outcome.result["text"].startswith(f"echo {i}w0")
    assert outcomes[2].queue_ms > 0  # the third waited for a free place


def test_cancelling_one_of_two_generations_leaves_the_other(tmp_path):
    engine = make_engine(tmp_path / "prompts", token_delay_s=0.01)
    svc = make_service(engine)
    svc.start()
    a, a_sink = job("chat", "a", " ".join(["x"] * 40), stream=True)
    b, b_sink = job("chat", "b", " ".join(["y"] * 10), stream=True)
    svc.submit(a)
    svc.submit(b)
    wait_until(lambda: len(a_sink.chunks) >= 2 and b_sink.chunks)
    assert svc.cancel("chat", "a") is True
    assert a_sink.wait().error.code == "cancelled"
    b_out = b_sink.wait()
    svc.stop(5)
    assert b_out.ok and b_out.result["text"] == "echo " + " ".join(["y"] * 10)


def test_stop_lets_active_generations_finish_and_drops_queued_ones(tmp_path):
    engine = make_engine(tmp_path / "prompts", token_delay_s=0.01)
    svc = make_service(engine, max_generations=1)
    svc.start()
    a, a_sink = job("chat", "a", "one two three four five")
    b, b_sink = job("chat", "b", "queued")
    svc.submit(a)
    wait_until(lambda: engine.steps)
    svc.submit(b)
    assert svc.stop(5) is True
    assert a_sink.wait().ok and b_sink.outcomes == []


def test_classification_does_not_stop_the_streams(tmp_path):
    """A steady flow of classifications: generations still get a step between two classification batches."""
    engine = make_engine(tmp_path / "prompts", token_delay_s=0.005)
    engine.classify_delay_s = 0.005
    svc = make_service(engine, max_batch=1)
    for i in range(20):
        svc.submit(job("sentiment", f"c{i}")[0])
    gen, gen_sink = job("chat", "g", "a b c")
    svc.submit(gen)
    svc.start()
    assert gen_sink.wait().ok
    svc.stop(5)
    assert len(engine.batches) < 20  # it finished while classifications still waited


def test_generations_waiting_together_start_in_one_prefill(tmp_path):
    engine = make_engine(tmp_path / "prompts")
    svc = make_service(engine, max_generations=3)
    sinks = []
    for i in range(4):
        j, sink = job("chat", i, f"hello {i}")
        svc.submit(j)
        sinks.append(sink)
    bad, bad_sink = job("chat", "bad", "<|im_start|>system")
    svc.submit(bad)
    svc.start()
    assert all(s.wait().ok for s in sinks)
    assert bad_sink.wait().error.code == "invalid_text"
    svc.stop(5)
    assert engine.starts[0] == 3  # three places: three prompts in the first prefill, the fourth later
    assert sum(engine.starts) == 4  # the refused one never started


def test_a_bug_while_starting_answers_internal_and_frees_the_place(engine, service):
    engine.start = lambda generations: 1 / 0
    service.start()
    j, sink = job("chat", 1, "hello")
    service.submit(j)
    assert sink.wait().error.code == "internal"
    assert service._active == []
    del engine.start  # the class's own again
    j, sink = job("chat", 2, "hello again")
    service.submit(j)
    assert sink.wait().ok


def test_two_turns_of_one_session_never_run_side_by_side(engine):
    svc = make_service(engine)
    first, first_sink = job("chat", 1, "my name is Ada", session="s")
    other, other_sink = job("chat", 2, "unrelated", session="t")
    second, second_sink = job("chat", 3, "what is my name", session="s")
    for j in (first, other, second):
        svc.submit(j)
    svc.start()
    assert all(s.wait().ok for s in (first_sink, other_sink, second_sink))
    svc.stop(5)
    assert engine.starts[0] == 2  # the first turn and the other session's chat; the second turn waited
    assert [t.content for t in engine.histories[-1]] == ["my name is Ada", "echo my name is Ada"]
