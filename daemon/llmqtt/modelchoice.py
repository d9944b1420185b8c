"""Which built-in model a board should run: from its memory and cores, and its measured speed where
`llmqtt bench` has measured it. A pure function of the readings, tested with fake boards; `llmqtt doctor`
prints it.

The rule, largest model first (the 1.5B averaged 0.898 on independent en/zh sentiment sets against the
0.5B's 0.835, at 3.7x the compute per message: 1.31 B weights outside the vocabulary tables against
0.36 B; issue #17):
- memory: its serving memory (weights + KV cache + activations + runtime at batch 4 x 1024 tokens, the
  planner's estimate) must stay within 60 % of the board's RAM (or its cgroup limit), leaving the rest to
  the OS, mosquitto and Home Assistant, which share an edge board;
- cores: a model over 1B parameters needs 4 usable cores: on fewer, 3.7x the 0.5B's compute per message
  (already ~330 ms per sentiment on 2 x86 cores, docs/bench) leaves no headroom for bursts;
- speed, where measured on this board: sentiment p50 <= 1 s per message and chat >= 5 tokens/s (about
  reading speed); a slower measurement rules a model out whatever its memory says.
The smallest model is the fallback when none passes; the planner then says whether it fits at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .config import choose_quantize
from .engine.modelstore import BUILTIN_MODELS, BuiltinModel
from .modelfacts import ModelFacts, facts_from_config
from .planner import GiB, estimate_memory, usable_cores
from .readings import SystemReadings

RAM_SHARE = 0.6  # of RAM (or the cgroup limit) the model may plan to use while serving
PLAN_BATCH, PLAN_CONTEXT = 4, 1024  # the serving shape sized for: the Pi 5 4 GB config's limits
LARGE_PARAMS = 1_000_000_000
MIN_CORES_LARGE = 4
MAX_SENTIMENT_MS = 1000.0
MIN_CHAT_TOKENS_PER_S = 5.0


@dataclass(frozen=True)
class Speed:
    """Measured on this board by `llmqtt bench`: classification path p50, chat decode rate."""

    sentiment_ms: float
    chat_tokens_per_s: float


@dataclass(frozen=True)
class Option:
    name: str
    serving_bytes: int  # the planner's steady-state estimate at PLAN_BATCH x PLAN_CONTEXT
    ok: bool
    why: str


@dataclass(frozen=True)
class Recommendation:
    name: str  # what to put in `model:`
    reason: str  # one sentence for a person
    options: tuple[Option, ...]  # every built-in model, largest first, with its verdict


def recommend_model(readings: SystemReadings, quantize: str = "none",
                    measured: Mapping[str, Speed] | None = None) -> Recommendation:
    """The largest built-in model this board can afford; `quantize` is the config's `model.quantize`
    (`auto` is resolved for this CPU, as the daemon will load it)."""
    measured = measured or {}
    scheme, _ = choose_quantize(quantize, readings.arch, readings.cpu_flags)
    models = sorted(BUILTIN_MODELS.values(), key=_params, reverse=True)
    options = tuple(_judge(m, readings, scheme, measured.get(m.name)) for m in models)
    chosen = next((o for o in options if o.ok), options[-1])
    reason = f"this board: {chosen.name} " + ("fits" if chosen.ok else "is the smallest built-in model") + \
        f" ({chosen.why})"
    for other in options:
        if other.name != chosen.name:
            reason += "; " + _alternative(other, chosen, measured.get(other.name))
    return Recommendation(chosen.name, reason, options)


def _alternative(other: Option, chosen: Option, speed: Speed | None) -> str:
    """How another built-in model compares: why not the larger one; what the smaller one buys."""
    if not other.ok or other.serving_bytes >= chosen.serving_bytes:
        return f"{other.name}: {other.why}"
    compute = _compute(_facts(chosen.name)) / _compute(_facts(other.name))
    faster = f"{compute:.1f}x less compute per message" + (
        f"; sentiment ~{speed.sentiment_ms:.0f} ms, chat ~{speed.chat_tokens_per_s:.1f} tok/s measured" if speed else "")
    return (f"{other.name} if you need faster answers ({faster}) or "
            f"{(chosen.serving_bytes - other.serving_bytes) / GiB:.1f} GiB more memory for the rest of the board")


def _facts(name: str) -> ModelFacts:
    return facts_from_config(BUILTIN_MODELS[name].architecture)


def _compute(facts: ModelFacts) -> int:
    """Weights a message's tokens run through: every parameter but the embedding table and the output
    matrix (a classification reads a few of its rows; untied in both built-in conversions)."""
    vocab_tables = (1 if facts.tie_word_embeddings else 2) * facts.vocab_size * facts.hidden_size
    return facts.param_count - vocab_tables


def _params(model: BuiltinModel) -> int:
    return facts_from_config(model.architecture).param_count


def _judge(model: BuiltinModel, readings: SystemReadings, quantize: str, speed: Speed | None) -> Option:
    facts = facts_from_config(model.architecture)
    serving = estimate_memory(facts, "float32", quantize, PLAN_CONTEXT, PLAN_BATCH).steady
    room = _room(readings)
    cores = usable_cores(readings)
    memory = f"~{serving / GiB:.1f} GiB serving" + ("" if quantize == "none" else f" with {quantize}")
    if room is not None and serving > room:
        return Option(model.name, serving, False, f"{memory} is over {RAM_SHARE:.0%} of "
                      f"{room / RAM_SHARE / GiB:.1f} GiB")
    if facts.param_count > LARGE_PARAMS and cores < MIN_CORES_LARGE:
        return Option(model.name, serving, False, f"{cores} usable cores; it needs {MIN_CORES_LARGE} for "
                      f"{facts.param_count / 1e9:.1f}B parameters")
    if speed is None:
        return Option(model.name, serving, True, f"{memory}, {cores} cores; speed not measured on this board "
                      "(llmqtt bench)")
    measured = f"sentiment ~{speed.sentiment_ms:.0f} ms, chat ~{speed.chat_tokens_per_s:.1f} tok/s measured"
    if speed.sentiment_ms > MAX_SENTIMENT_MS or speed.chat_tokens_per_s < MIN_CHAT_TOKENS_PER_S:
        return Option(model.name, serving, False, f"{measured}: slower than {MAX_SENTIMENT_MS:.0f} ms or "
                      f"{MIN_CHAT_TOKENS_PER_S:g} tok/s")
    return Option(model.name, serving, True, f"{memory}, {measured}")


def _room(readings: SystemReadings) -> int | None:
    limits = [v for v in (readings.ram_total, _cgroup_limit(readings)) if v is not None]
    return int(min(limits) * RAM_SHARE) if limits else None


def _cgroup_limit(readings: SystemReadings) -> int | None:
    return readings.cgroup_memory_max if isinstance(readings.cgroup_memory_max, int) else None


def speed_from_bench(result: Mapping[str, Any], quantize: str = "none") -> tuple[str, Speed] | None:
    """(built-in model name, Speed) from an `llmqtt bench` result.json, for the variant that loads the way
    `quantize` (resolved for this board) does: `fp32` for none, else the default config's variant when it
    ran that scheme (its dtype reads e.g. `float32+int8`), or an older run's variant named after it."""
    model = next((m for m in BUILTIN_MODELS.values() if m.display_name == result.get("meta", {}).get("model")), None)
    variants = result.get("variants") or {}
    default = variants.get("default") or {}
    if quantize == "none":
        variant = variants.get("fp32")
    elif str(default.get("dtype", "")).endswith(f"+{quantize}"):
        variant = default
    else:
        variant = variants.get(quantize)
    if model is None or not variant:
        return None
    try:
        return model.name, Speed(float(variant["sentiment"]["classify_one"]["p50_ms"]),
                                 float(variant["chat"]["decode_tokens_per_s"]))
    except (KeyError, TypeError, ValueError):
        return None
