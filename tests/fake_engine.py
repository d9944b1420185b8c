"""A small fake `InferenceEngine` for service, MQTT and daemon tests that need no torch.

`load_engine` is an engine factory for `llmqtt.build.build_engine` (a subprocess daemon gets it through
tests/fake_daemon.py); `LLMQTT_FAKE_TOKEN_DELAY_S` slows its generation down per token. `write_model_dir`
makes a model directory with only a config.json: enough to resolve and plan for, nothing to load.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from llmqtt.engine.types import ChatOptions, Classification, GenerationResult, InvalidText, Turn
from llmqtt.tasks import ClassifyTask, GenerateTask, load_tasks

SENTIMENT = """\
kind: classify
system: You are a sentiment classifier. Answer with one word.
labels: [positive, negative]
"""
TOPIC = """\
kind: classify
system: Classify the topic.
labels: [weather, music, other]
"""
CHAT = """\
kind: generate
system: You are a helpful assistant.
generation: {max_new_tokens: 32}
history: {max_turns: 4}
"""


def write_prompts(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in (("sentiment", SENTIMENT), ("topic", TOPIC), ("chat", CHAT)):
        (directory / f"{name}.yaml").write_text(body, encoding="utf-8")
    return directory


class FakeStream:
    """A word per step; `start()` gives the first word."""

    def __init__(self, words: list[str], cancel: threading.Event | None, history_turns: int):
        self.result = GenerationResult(prompt_tokens=7, history_turns_used=history_turns)
        self._words, self._cancel = words, cancel
        self.done = False
        self._started = 0.0

    def start(self) -> str:
        self._started = time.monotonic()
        self.result.finish_reason = "length"
        return self.advance()

    def advance(self) -> str:
        if self._cancel is not None and self._cancel.is_set():
            self.result.finish_reason = "cancelled"
            self.done = True
            return ""
        i = self.result.new_tokens
        piece = self._words[i] if i == 0 else " " + self._words[i]
        self.result.text += piece
        self.result.new_tokens += 1
        self.result.decode_s = time.monotonic() - self._started
        if self.result.new_tokens == len(self._words):
            self.result.finish_reason = "stop"
            self.done = True
        return piece

    def close(self) -> None:
        self.done = True

    def __iter__(self):
        piece = self.start()
        while True:
            yield piece
            if self.done:
                return
            piece = self.advance()


class FakeEngine:
    """Classifies by keyword ("love"/"great" -> positive); generates `echo <words of the text>`."""

    dtype = "float32"
    max_batch = 16
    weight_bytes = 1234

    def __init__(self, tasks: Mapping[str, ClassifyTask | GenerateTask], token_delay_s: float = 0.0,
                 model_name: str = "fake-model"):
        self.tasks = dict(tasks)
        self.model_name = model_name
        self.token_delay_s = token_delay_s
        self.batches: list[tuple[str, int]] = []  # (task, batch size) of every classify call
        self.histories: list[list[Turn]] = []
        self.options: list[ChatOptions | None] = []  # of every generate call
        self.gate: threading.Event | None = None  # when set to an unset Event, decode steps and classify wait on it
        self.steps: list[int] = []  # how many generations each decode step ran together
        self.starts: list[int] = []  # how many generations each prefill started together
        self.classify_delay_s = 0.0  # per classify call (a batch), like a forward pass
        self.warmed_up = False
        self.idle_threads: list[str] = []  # the thread of every idle() call, in order

    def warmup(self) -> None:
        self.warmed_up = True

    def start_fast_decode(self) -> None:
        pass

    def fast_decode_state(self) -> str:
        return "off"

    def idle(self) -> None:
        self.idle_threads.append(threading.current_thread().name)

    def conversation_stats(self) -> dict:
        return {"entries": 0, "hits": 0}

    def classify(self, task: str, texts: Sequence[str]) -> list[Classification]:
        self.batches.append((task, len(texts)))
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.classify_delay_s)
        for text in texts:
            if "<|im_start|>" in text:
                raise InvalidText("text contains chat-control tokens")
        labels = list(self.tasks[task].labels)
        out = []
        for text in texts:
            label = labels[0] if any(w in text.lower() for w in ("love", "great", "rain")) else labels[1]
            scores = {name: (0.9 if name == label else 0.1 / (len(labels) - 1)) for name in labels}
            out.append(Classification(label, scores[label], scores))
        return out

    def generate(self, task: str, text: str, history: Sequence[Turn] = (),
                 cancel: threading.Event | None = None, max_new_tokens: int | None = None,
                 options: ChatOptions | None = None) -> FakeStream:
        if "<|im_start|>" in text:
            raise InvalidText("text contains chat-control tokens")
        self.histories.append(list(history))
        self.options.append(options)
        limit = max_new_tokens or self.tasks[task].generation.max_new_tokens
        words = ["echo", *text.split()][:limit]
        return FakeStream(words, cancel, len(history) // 2)

    def start(self, generations: Sequence[FakeStream]) -> list[str]:
        """Prefill for generations that start together: each one's first word."""
        self.starts.append(len(generations))
        return [g.start() for g in generations]

    def step(self, generations: Sequence[FakeStream]) -> list[str]:
        """One token for every generation, in the time of one (a batched decode step)."""
        going = [g for g in generations if not g.done]
        self.steps.append(len(going))
        if self.gate is not None:
            self.gate.wait(30)
        if self.token_delay_s:
            cancels = [g._cancel for g in going if g._cancel is not None]
            deadline = time.monotonic() + self.token_delay_s
            while time.monotonic() < deadline and not any(c.is_set() for c in cancels):
                time.sleep(min(0.01, self.token_delay_s))
        return [g.advance() if not g.done else "" for g in generations]


def load_engine(model_config, tasks, *, max_batch: int = 16, progress=None, resolved=None) -> FakeEngine:
    """Same signature as `llmqtt.engine.load_engine`: an engine factory for `build_engine`."""
    engine = FakeEngine(tasks, token_delay_s=float(os.environ.get("LLMQTT_FAKE_TOKEN_DELAY_S", "0")),
                        model_name=f"fake:{Path(model_config.name).name}")
    engine.max_batch = max_batch
    engine.dtype = model_config.dtype
    return engine


# A small Qwen2-shaped config.json: the planner reads these numbers (no weights: counted from the config).
FAKE_MODEL_CONFIG = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 600, "intermediate_size": 128,
                     "tie_word_embeddings": True}


def write_model_dir(directory: Path, **overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**FAKE_MODEL_CONFIG, **overrides}), encoding="utf-8")
    return directory


def make_engine(prompts_dir: Path, **kwargs) -> FakeEngine:
    return FakeEngine(load_tasks([write_prompts(prompts_dir)]), **kwargs)
