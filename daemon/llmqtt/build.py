"""Config -> a warm engine, the one way: resolve -> read the machine -> plan -> check fit -> load -> warm.

`llmqtt run` (daemon.main), `llmqtt ask`, `llmqtt bench` and the bench's start-up children all call
`build_engine`, so what the bench measures is what the daemon serves: the same threads, dtype, batch and
context for this machine. Planning happens before torch is imported (`apply_threads` must reach OpenMP
before it starts), and a model that cannot fit is refused with an explanation before any weight is read.

The load step is a parameter (`factory`, `llmqtt.engine.load_engine` by default): tests pass a fake engine
and still go through resolve, plan and warm-up.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

from .config import Config, ModelConfig
from .engine.modelstore import ModelUnavailable, Progress, ResolvedModel, _no_progress, resolve_model
from .engine.types import InferenceEngine
from .explain import ModelTooLarge, check_fits, explain
from .memoryguard import MemoryGuard
from .modelfacts import ModelFactsError, read_model_facts
from .planner import Plan, apply_threads, plan
from .readings import live_available_bytes, read_system
from .tasks import ClassifyTask, GenerateTask, task_files

log = logging.getLogger(__name__)

# What stops a start on this machine (exit status 1: the config is fine, the model or the room is not).
# A task file the model cannot serve is a TaskNotServable, a TaskFileError: a config error (exit 2).
START_ERRORS = (ModelUnavailable, ModelTooLarge, ModelFactsError)

Tasks = Mapping[str, ClassifyTask | GenerateTask]


class EngineFactory(Protocol):
    """The load step; `llmqtt.engine.load_engine` is the real one."""

    def __call__(self, config: ModelConfig, tasks: Tasks, *, max_batch: int, progress: Progress,
                  resolved: ResolvedModel) -> InferenceEngine: ...


@dataclass(frozen=True)
class WarmEngine:
    engine: InferenceEngine
    plan: Plan
    memory: MemoryGuard  # watches free memory while serving, at the plan's threshold
    resolved: ResolvedModel

    @property
    def threads(self) -> int:
        return self.plan.threads


def build_engine(config: Config, tasks: Tasks, *, factory: EngineFactory | None = None,
                 progress: Progress | None = None, resolved: ResolvedModel | None = None,
                 warm: bool | None = None) -> WarmEngine:
    """Raises one of START_ERRORS, or TaskNotServable. `warm` defaults to `runtime.warmup`."""
    progress = progress or _no_progress
    resolved = resolved or resolve_model(config.model, progress)
    p = plan_for(config, resolved)
    apply_threads(p)
    model_config = config.model.model_copy(update={"max_context": p.max_context, "dtype": p.dtype})
    load = factory or functools.partial(_load_engine, heads=head_files(config))
    engine = load(model_config, tasks, max_batch=p.max_batch, progress=progress, resolved=resolved)
    if config.runtime.warmup if warm is None else warm:
        progress("warming up", 0, 0)
        started = time.monotonic()
        engine.warmup()
        log.info("warm-up took %.1fs", time.monotonic() - started)
    engine.idle()  # this thread is done with torch: the service's worker serves (engine/openmp.py)
    return WarmEngine(engine, p, MemoryGuard(p.low_memory_bytes, live_available_bytes), resolved)


def plan_for(config: Config, resolved: ResolvedModel) -> Plan:
    """Threads, dtype, batch and context sized to this machine; ModelTooLarge explains why not and what to change."""
    facts = read_model_facts(resolved.path)
    p = plan(read_system(), facts, config.model, config.runtime)
    check_fits(p, facts)
    if p.verdict == "swap":
        log.warning("%s", explain(p, facts))
    for note in p.notes:
        log.warning("%s", note)
    log.info("plan: %d threads, %s%s, batch %d, context %d tokens", p.threads, p.dtype,
             "" if p.quantize == "none" else f"+{p.quantize}", p.max_batch, p.max_context)
    return p


def head_files(config: Config) -> dict[str, list[Path]]:
    """Each task's learned-head files (`llmqtt fit`), beside its task file; the first that fits is used."""
    from .engine.headfile import head_paths

    return {name: head_paths(path) for name, path in task_files(config.prompt_dirs()).items()}


def _load_engine(config: ModelConfig, tasks: Tasks, *, max_batch: int, progress: Progress,
                 resolved: ResolvedModel, heads: Mapping[str, list[Path]]) -> InferenceEngine:
    from .engine import load_engine  # imports torch: only after apply_threads

    return load_engine(config, tasks, max_batch=max_batch, progress=progress, resolved=resolved, heads=heads)

