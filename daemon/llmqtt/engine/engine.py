"""The engine: one loaded model serving every task. Knows nothing of MQTT."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from ..tasks import ClassifyTask, GenerateTask
from . import openmp
from .classify import LabelScorer
from .convcache import ConversationCache
from .decode import StaticDecoder
from .generate import ChatGenerator, Generation, start, step
from .head import Head, mismatch
from .headfile import compute_scheme, serves_under
from .loader import LoadedModel
from .prefixstore import PrefixStore
from .types import ChatOptions, Classification, Turn, UnknownTask, WrongTaskKind

log = logging.getLogger(__name__)

Task = ClassifyTask | GenerateTask


FX_TRACING_RETRIES = 3


def _past_tracing(forward):
    """`forward()`, again if it ran into the decode compile's tracing. While torch.compile builds the decode
    step on its background thread, torch.fx briefly patches `nn.Module.__call__` for the whole process
    (inductor symbolic-traces small helpers); a forward on another thread in that instant fails with
    NameError 'module is not installed as a submodule' (seen once on the demo model, a classification
    during the compile). A classification is pure (the cached prefix is only read), so it can simply run
    again; the window is a few milliseconds."""
    for attempt in range(FX_TRACING_RETRIES):
        try:
            return forward()
        except NameError as exc:
            if "not installed as a submodule" not in str(exc) or attempt == FX_TRACING_RETRIES - 1:
                raise
            log.info("classification ran into the decode compile's tracing; running it again")
            time.sleep(0.01 * (attempt + 1))


class Engine:
    """Implements `types.InferenceEngine`. Builds every task's cached prefix at construction."""

    def __init__(self, loaded: LoadedModel, tasks: Mapping[str, Task], model_name: str, match_name: str,
                 max_context: int = 2048, max_batch: int = 16, prefix_store: PrefixStore | None = None,
                 conversation_tokens: int = 4096, conversation_tolerant: bool = False,
                 heads: Mapping[str, Sequence[Head]] | None = None, weights: str = "",
                 decode_step: Path | None = None):
        self.loaded = loaded
        self.model_name = model_name
        self.dtype = compute_scheme(loaded.dtype, loaded.quantize)
        self.max_batch = max_batch
        self.weight_bytes = loaded.weight_bytes
        self.weights = weights  # fingerprint of the model's weight files (headfile.weights_fingerprint)
        self.tasks = {name: task.for_model(match_name) for name, task in tasks.items()}
        self._scorers: dict[str, LabelScorer] = {}
        self._generators: dict[str, ChatGenerator] = {}
        # One budget for every generate task: recent conversations' KV, reused by the next turn.
        self.conversations = ConversationCache(conversation_tokens, tolerant=conversation_tolerant)
        # One static KV cache and compiled step shared by every generate task: the first active generation's;
        # others running beside it get caches of their own and step together with it (batch.py). The compiled
        # step is kept at `decode_step` (decode.saved_step_stem) for the next start.
        self.decoder = StaticDecoder(loaded.model, max_context, decode_step)
        for name, task in self.tasks.items():
            if isinstance(task, ClassifyTask):
                scorer = LabelScorer(loaded.model, loaded.tokenizer, task, max_context, prefix_store)
                scorer.head = self._usable_head(name, (heads or {}).get(name, ()), scorer)
                self._scorers[name] = scorer
            else:
                self._generators[name] = ChatGenerator(loaded.model, loaded.tokenizer, task, max_context, prefix_store,
                                                       self.conversations, self.decoder)

    def classify(self, task: str, texts: Sequence[str], use_head: bool = True) -> list[Classification]:
        """`use_head=False`: the prompt's label logits even where the task has a head (the bench compares)."""
        scorer = self._scorer(task)
        return _past_tracing(lambda: scorer.score(list(texts), self.max_batch, use_head))

    def generate(self, task: str, text: str, history: Sequence[Turn] = (),
                 cancel: threading.Event | None = None, max_new_tokens: int | None = None,
                 options: ChatOptions | None = None) -> Generation:
        """A generation, prepared but not run: `start()` it, then `step` it (or iterate it alone)."""
        return self._generator(task).stream(text, history, cancel, max_new_tokens, options=options)

    def start(self, generations: Sequence[Generation]) -> list[str]:
        """Prefill for generations that start together, one forward for all: each one's first text."""
        return start(generations)

    def step(self, generations: Sequence[Generation]) -> list[str]:
        """One decode step for every started generation, one forward for all: each one's new text."""
        return step(generations)

    def conversation_stats(self) -> dict:
        return {"entries": len(self.conversations), "hits": self.conversations.hits}

    def kind(self, task: str) -> str:
        if task not in self.tasks:
            raise UnknownTask(f"no task named {task!r} (tasks: {', '.join(sorted(self.tasks))})")
        return self.tasks[task].kind

    def warmup(self) -> None:
        """One small request through the serving path, so a broken task fails at start, not at a request.

        The loader has already run one token through the whole model, so every weight is read and the
        decode shapes are set up; one classification (or, without classify tasks, one generated token)
        adds the prefix-cache path. Timed: the first call costs the same as the ones after it.
        """
        if self._scorers:
            self.classify(next(iter(self._scorers)), ["warm-up"])
        elif self._generators:
            for _ in self.generate(next(iter(self._generators)), "Hi", max_new_tokens=1):
                pass

    def idle(self) -> None:
        """The calling thread is done with the engine for now: its OpenMP threads go (openmp.py), so the
        thread that runs the engine next is the only one with a team and keeps full speed."""
        openmp.release_threads()

    def start_fast_decode(self) -> None:
        """Build the fast decode kernels on a background thread, if this model has them. Called once the
        engine is warm: compiling competes for the CPU, so it must not slow the start-up itself.

        float32: one-row Linear kernels (fastdecode.py); quantized: the whole decode step (decode.py)."""
        built = self._fast_decode()
        if built is not None:
            built.start()

    def fast_decode_state(self) -> str:
        """"pending" (being compiled or loaded after READY: decode is eager meanwhile), "ready", "failed"
        (eager for good), or "off" (nothing to build for this model and config)."""
        built = self._fast_decode()
        return "off" if built is None else built.state()

    def _fast_decode(self):
        """What `model.fast_decode` builds for this model (fastdecode.Kernels or decode.StaticDecoder), or None."""
        if self.loaded.kernels:
            return self.loaded.kernels
        if self.loaded.quantize != "none" and self._generators and self.loaded.compile_decode:
            return self.decoder
        return None

    def prefixes_from_disk(self) -> int:
        """How many tasks' prefix caches came from the prefix store rather than a forward pass."""
        return sum(p.prefix.from_disk for p in [*self._scorers.values(), *self._generators.values()])

    def head(self, task: str) -> Head | None:
        """The learned head a classify task answers with, or None (label logits)."""
        return self._scorers[task].head if task in self._scorers else None

    def _usable_head(self, name: str, heads: Sequence[Head], scorer: LabelScorer) -> Head | None:
        """The first of the task's heads fitted for this model, prompt and compute scheme; else None, with
        the reasons logged (the task answers from its prompt)."""
        reasons = []
        for head in heads:
            why = mismatch(head, self.weights, scorer.label_names, self.loaded.model.config.num_hidden_layers,
                           scorer.prompt_fingerprint())
            if why:
                reasons.append((logging.WARNING, why))
            elif not serves_under(head.meta.get("scheme", "?"), self.dtype):
                # Hidden states shift under quantization (headfile.serves_under). info, not warning: a task
                # shipped with heads for several schemes meets the others on every start.
                reasons.append((logging.INFO, f"fitted under {head.meta.get('scheme')}, serving {self.dtype} "
                                              "(re-fit with `llmqtt fit` under this scheme)"))
            else:
                log.info("task %r: learned head (%s, fitted under %s, cross-validated %.1f %% on %d rows)", name,
                         head.features.describe(), head.meta.get("scheme"), 100 * head.meta.get("cv_accuracy", 0),
                         head.meta.get("rows", 0))
                return head
        for level, why in reasons:
            log.log(level, "task %r: not using a learned head: %s. The task answers from its prompt.", name, why)
        return None

    def _scorer(self, task: str) -> LabelScorer:
        if self.kind(task) != "classify":
            raise WrongTaskKind(f"task {task!r} is a {self.kind(task)} task, not classify")
        return self._scorers[task]

    def _generator(self, task: str) -> ChatGenerator:
        if self.kind(task) != "generate":
            raise WrongTaskKind(f"task {task!r} is a {self.kind(task)} task, not generate")
        return self._generators[task]
