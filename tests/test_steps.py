"""Batched decode steps (engine/batch.py) on the tiny random Qwen2 model: several generations stepping
together, each at its own position, pick exactly the tokens each would pick alone (greedy)."""

from __future__ import annotations

import threading

import pytest
import torch

from llmqtt.engine.engine import Engine
from llmqtt.engine.generate import step
from llmqtt.engine.loader import load
from llmqtt.engine.types import ChatOptions, Turn
from llmqtt.tasks import parse_task

CHAT = {"kind": "generate", "system": "Hello, how are you today?",
        "generation": {"max_new_tokens": 24, "temperature": 0.0, "repetition_penalty": 1.1},
        "history": {"max_turns": 4, "max_tokens": 200}}

# Prompts of different lengths: the rows sit at different positions in one step.
PROMPTS = ["Hello", "I love this product, it is great. The food was good.", "这个酒店很好，服务非常好。",
           "Summarize the text in one sentence. Keywords: positive negative neutral joy anger"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(load(tiny_model_dir, "float32"), {"chat": parse_task(CHAT, "t", "chat")}, "tiny", "tiny",
                  max_context=512, conversation_tokens=0)


def alone(engine: Engine, text: str, **kw) -> tuple[list[int], str, str]:
    generation = engine.generate("chat", text, **kw)
    pieces = list(generation)
    assert "".join(pieces) == generation.result.text
    return generation.tokens, generation.result.text, generation.result.finish_reason


def together(engine: Engine, texts: list[str], join_at: dict[int, int] | None = None, **kw):
    """Generations stepped together; text i joins after join_at[i] steps (0: from the start)."""
    join_at = join_at or {}
    pending = {i: engine.generate("chat", t, **kw) for i, t in enumerate(texts)}
    active, texts_out, steps = {}, {i: "" for i in pending}, 0
    while pending or any(not g.done for g in active.values()):
        joining = [i for i in pending if join_at.get(i, 0) <= steps]
        for i in joining:
            active[i] = pending.pop(i)
        for i, piece in zip(joining, engine.start([active[i] for i in joining]) if joining else []):
            texts_out[i] += piece  # admitted between steps, their prompts in one forward, as the service does
        going = [i for i, g in active.items() if not g.done]
        for i, piece in zip(going, engine.step([active[i] for i in going])):
            texts_out[i] += piece
        steps += 1
    for i, g in active.items():
        assert texts_out[i] == g.result.text
    return [(active[i].tokens, active[i].result.text, active[i].result.finish_reason) for i in range(len(texts))]


def test_batched_steps_equal_one_by_one_token_for_token(engine):
    expected = [alone(engine, t) for t in PROMPTS]
    assert all(len(tokens) >= 4 for tokens, _, _ in expected)  # long enough to mean something
    assert together(engine, PROMPTS) == expected  # prompts in one prefill, then every step batched


def test_batched_prefill_logits_match_one_prompt_alone(engine):
    from llmqtt.engine.batch import forward_rows

    generations = [engine.generate("chat", t) for t in PROMPTS[:3]]
    rests = [g._open() for g in generations]
    assert len({len(r) for r in rests}) == 3  # right padding is exercised
    rows = forward_rows(engine.loaded.model, rests, [g.cache for g in generations], [g.position for g in generations])
    for g, rest, row in zip(generations, rests, rows):
        keys = g.cache.layers[1].keys[:, :, :g.position + len(rest)].clone()
        g.close()
        alone_one = engine.generate("chat", PROMPTS[generations.index(g)])
        alone_rest = alone_one._open()
        single = alone_one.decoder.prefill(torch.tensor([alone_rest]), alone_one.cache, alone_one.position)
        assert torch.allclose(row, single, atol=1e-4, rtol=1e-4)
        assert torch.allclose(keys, alone_one.cache.layers[1].keys[:, :, :keys.shape[2]], atol=1e-5)
        alone_one.close()


def test_a_generation_joining_midway_and_others_leaving_early_change_nothing(engine):
    short = {"max_new_tokens": 5}
    expected = [alone(engine, t) for t in PROMPTS[:2]] + [alone(engine, PROMPTS[2], **short)]
    got = together(engine, PROMPTS[:2], join_at={1: 3})
    got += together(engine, [PROMPTS[2]], **short)
    assert got == expected
    # One stepping alone, the others beside it: a short one leaves after 5 tokens, the rest go on in a batch.
    mixed = [engine.generate("chat", PROMPTS[0]), engine.generate("chat", PROMPTS[1], max_new_tokens=5),
             engine.generate("chat", PROMPTS[3])]
    for g in mixed:
        g.start()
    while not all(g.done for g in mixed):
        engine.step(mixed)
    assert [g.tokens for g in mixed] == [alone(engine, PROMPTS[0])[0], alone(engine, PROMPTS[1], max_new_tokens=5)[0],
                                         alone(engine, PROMPTS[3])[0]]


def test_client_history_and_system_rows_batch_with_task_rows(engine):
    history = [Turn("user", "Hello"), Turn("assistant", "positive joy")]
    kw = [{}, {"history": history}, {"options": ChatOptions(system="You are terse.")}]
    expected = [alone(engine, "The food was good.", **k) for k in kw]
    generations = [engine.generate("chat", "The food was good.", **k) for k in kw]
    engine.start(generations)  # three prompts of different lengths and starts (cached or not) in one prefill
    while not all(g.done for g in generations):
        engine.step(generations)
    assert [(g.tokens, g.result.text, g.result.finish_reason) for g in generations] == expected


def test_a_cancelled_row_leaves_the_step_and_the_rest_go_on(engine):
    cancel = threading.Event()
    expected = alone(engine, PROMPTS[1])
    a, b = engine.generate("chat", PROMPTS[0], cancel=cancel), engine.generate("chat", PROMPTS[1])
    a.start(), b.start()
    engine.step([a, b])
    cancel.set()
    engine.step([a, b])
    assert a.done and a.result.finish_reason == "cancelled" and a.result.new_tokens == 2
    while not b.done:
        engine.step([a, b])
    assert (b.tokens, b.result.text, b.result.finish_reason) == expected


def test_the_shared_cache_is_released_when_a_generation_ends_or_is_closed(engine):
    decoder = engine.decoder
    g = engine.generate("chat", PROMPTS[0])
    g.start()
    assert g.cache is decoder._shared
    other = engine.generate("chat", PROMPTS[1])
    other.start()
    assert other.cache is not decoder._shared  # a private cache beside it
    g.close(), other.close()
    again = engine.generate("chat", PROMPTS[2])
    again.start()
    assert again.cache is decoder._shared
    again.close()


def test_batched_logits_match_single_row_logits(engine):
    """Below the tokens: each row's logits in a batched step are the single-row step's, to float tolerance."""
    a, b = engine.generate("chat", PROMPTS[0]), engine.generate("chat", PROMPTS[3])
    a.start(), b.start()
    from llmqtt.engine.batch import forward_rows

    before = [(g.cache.layers[0].keys.clone(), g.position) for g in (a, b)]
    rows = forward_rows(engine.loaded.model, [[a.token], [b.token]], [a.cache, b.cache], [a.position, b.position])
    for g, (keys, position), row in zip((a, b), before, rows):
        g.cache.layers[0].keys.copy_(keys)  # undo, then the same token alone
        for layer in g.cache.layers:
            layer.cumulative_length.sub_(1)
        single = engine.decoder.step(g.token, g.cache, position)
        assert torch.allclose(row, single, atol=1e-4, rtol=1e-4)
    a.close(), b.close()


def test_service_answers_a_classification_during_a_long_generation(tiny_model_dir):
    """The service with the real engine: a sentiment submitted while a chat streams is answered between two
    of its tokens, not after its end; the chat's answer is the one it gives alone."""

    from llmqtt.service import Job, Service
    from llmqtt.sessions import SessionStore
    from test_service import Sink

    sentiment = {"kind": "classify", "system": "You are a sentiment classifier. Answer with one word.",
                 "labels": {"positive": "positive", "negative": "negative"}}
    tasks = {"chat": parse_task({**CHAT, "generation": {**CHAT["generation"], "repetition_penalty": 1.0}}, "t", "chat"),
             "sentiment": parse_task(sentiment, "t", "sentiment")}
    engine = Engine(load(tiny_model_dir, "float32"), tasks, "tiny", "tiny", max_context=512, conversation_tokens=0)
    expected = "".join(engine.generate("chat", "Tell me a long story", max_new_tokens=150))
    svc = Service(engine, sessions=SessionStore(4, 60))
    svc.start()
    chat, cls = Sink(), Sink()
    order = []
    chat.finish = lambda o: (order.append("chat"), Sink.finish(chat, o))

    def on_chunk(seq, delta):
        Sink.chunk(chat, seq, delta)
        if seq == 2:  # the chat is streaming: now a sentiment arrives
            svc.submit(Job(task="sentiment", id="s", text="I love this product", sink=cls))

    chat.chunk = on_chunk
    cls.finish = lambda o: (order.append("sentiment"), Sink.finish(cls, o))
    svc.submit(Job(task="chat", id="g", text="Tell me a long story", sink=chat, stream=True, max_new_tokens=150))
    sentiment_out, chat_out = cls.wait(), chat.wait()
    svc.stop(5)
    assert sentiment_out.ok and chat_out.ok and chat_out.result["tokens"] == 150
    assert order == ["sentiment", "chat"]
    assert chat_out.result["text"] == expected == "".join(d for _, d in chat.chunks)
    assert sentiment_out.latency_ms < chat_out.latency_ms / 3  # it did not wait for the chat
