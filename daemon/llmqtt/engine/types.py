"""What the engine hands out: plain values and errors, importable without torch.

The service layer and the MQTT layer see only these, never tensors.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping, Protocol, Sequence

from ..tasks import ClassifyTask, GenerateTask, TaskFileError


class TaskNotServable(TaskFileError):
    """A task file that this model cannot serve (e.g. two labels start with the same token). Raised while
    loading; a config error like any other bad task file: `llmqtt run`/`ask` say so in one line, exit 2."""


class EngineError(Exception):
    """A request the engine refuses; `code` is stable and goes into error replies."""

    code = "engine_error"


class UnknownTask(EngineError):
    code = "unknown_task"


class WrongTaskKind(EngineError):
    code = "wrong_task_kind"


class InvalidText(EngineError):
    """Empty text, or text that carries the model's chat-control tokens (prompt injection)."""

    code = "invalid_text"


class TextTooLong(EngineError):
    code = "too_long"


@dataclass(frozen=True)
class Classification:
    label: str
    score: float  # softmax over the task's labels, of the chosen label
    scores: dict[str, float]  # every label's softmax score, summing to 1

    def as_dict(self) -> dict:
        return {"label": self.label, "score": round(self.score, 6),
                "scores": {k: round(v, 6) for k, v in self.scores.items()}}


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class ChatOptions:
    """Per-request settings of clients that speak the Ollama / OpenAI APIs; None keeps the task's own."""

    system: str | None = None  # replaces the task's system prompt (no cached task prefix then)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class GenerationResult:
    """Filled in while a generation streams; complete once the stream is exhausted."""

    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    cached_prefix_tokens: int = 0  # prompt tokens whose KV came from a cache (task prefix or conversation)
    history_turns_used: int = 0  # user+assistant pairs of history that fit the budget
    first_token_s: float | None = None
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


class GenerationStream(Protocol):
    """A generation run a step at a time (the service) or alone (iterate it: `llmqtt ask`, the bench)."""

    result: GenerationResult  # complete once `done`
    done: bool

    def start(self) -> str:
        """Prefill its prompt and pick the first token: that token's text ("" possible)."""

    def close(self) -> None:
        """Release what it holds (its KV cache); it is `done` after. Idempotent."""

    def __iter__(self) -> Iterator[str]: ...


class InferenceEngine(Protocol):
    """What the service and the daemon need from an engine (the real one, or a fake in tests)."""

    model_name: str
    dtype: str  # as shown in status and health: "float32", "float32+int8"
    tasks: Mapping[str, ClassifyTask | GenerateTask]
    max_batch: int  # the largest classification batch it was sized for (the plan's)
    weight_bytes: int  # the model's parameters in memory (Ollama's /api/tags reports it as the size)

    def warmup(self) -> None:
        """One small request through the serving path, so a broken task fails at start."""

    def start_fast_decode(self) -> None:
        """Begin any background optimisation (compiling decode kernels) once serving; may do nothing."""

    def fast_decode_state(self) -> str:
        """The background optimisation's state: "pending", "ready", "failed" or "off" (health shows it)."""

    def idle(self) -> None:
        """The calling thread has no engine work for now: let it free what it holds for that (threads)."""

    def conversation_stats(self) -> dict:
        """{"entries", "hits"} of the cross-request KV reuse (convcache.py), for /metrics."""

    def classify(self, task: str, texts: Sequence[str]) -> list[Classification]: ...

    def generate(self, task: str, text: str, history: Sequence[Turn] = (),
                 cancel: threading.Event | None = None,
                 max_new_tokens: int | None = None,
                 options: ChatOptions | None = None) -> GenerationStream:
        """Prepared, not run yet: `start` it (with others arriving together), then `step` it with the
        other active ones."""

    def start(self, generations: Sequence[GenerationStream]) -> list[str]:
        """Prefill for generations that start together, in one forward: each one's first text."""

    def step(self, generations: Sequence[GenerationStream]) -> list[str]:
        """One decode step for the started generations, together: each one's new text ("" if done)."""

