"""Turn 2 of a conversation sent the way HTTP clients send it (the whole history every turn), first token
with and without the cross-request KV reuse (engine/convcache.py), through the engine's serving path.

Four timings per repetition, each turn 2 after a fresh turn 1: the conversation cache off (everything after
the chat template's header runs again), on with the same system prompt (what the `ollama`/`openai` clients and
the web page send), and on with a system prompt whose time stamp moved on between the turns (what Home
Assistant sends: it renders its system prompt, current time included, every turn), where exact reuse stops
at the time stamp; and that again in the opt-in tolerant mode (`model.conversation_cache_mode`), which
recomputes the changed time stamp and reuses the rest.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from ..engine.types import ChatOptions, Turn

Tick = Callable[[int], None]
SYSTEM = ("You are a voice assistant for Home Assistant. Answer questions about the world truthfully. Answer in "
          "plain text. Keep it simple and to the point.\nAn overview of the areas and the devices in this smart "
          "home:\n" + "\n".join(f"- names: {room} light\n  domain: light\n  state: 'off'\n  areas: {room}"
                                  for room in ("Kitchen", "Living Room", "Hall", "Bedroom", "Office", "Garage")))
TURN_1 = "Which lights are in the house?"
TURN_2 = "And which one is in the garage?"


def with_time(clock: str) -> str:
    """The system prompt as Home Assistant 2025 renders it: the current time first."""
    return f"Current time is {clock}. Today's date is 2026-11-29.\n{SYSTEM}"


def turn_two(engine, task: str, reps: int, tick: Tick, answer_tokens: int = 32) -> dict:
    """`answer_tokens`: turn 1's answer (part of turn 2's history)."""
    cases = (("off", 0, "07:12:03", False), ("same_system", 4096, "07:12:03", False),
             ("new_time", 4096, "07:13:44", False), ("new_time_tolerant", 4096, "07:13:44", True))
    runs: dict[str, list[float]] = {case[0]: [] for case in cases}
    sizes: dict[str, tuple[int, int]] = {}
    saved, saved_tolerant = engine.conversations.max_tokens, engine.conversations.tolerant
    try:
        for _ in range(reps):
            for case, budget, second_clock, tolerant in cases:
                engine.conversations.max_tokens = max(budget, saved) if budget else 0
                engine.conversations.tolerant = tolerant
                engine.conversations.clear()
                answer = _first_turn(engine, task, with_time("07:12:03"), answer_tokens)
                seconds, prompt, cached = _second_turn_first_token(engine, task, with_time(second_clock), answer)
                runs[case].append(seconds)
                sizes[case] = (prompt, cached)
            tick(1)
    finally:
        engine.conversations.max_tokens, engine.conversations.tolerant = saved, saved_tolerant
        engine.conversations.clear()
    out: dict = {"reps": reps, "prompt_tokens": sizes["off"][0]}
    for case, seconds in runs.items():
        out[case] = {"first_token_ms": 1000 * statistics.median(seconds), "runs_ms": [1000 * s for s in seconds],
                     "tokens_run": sizes[case][0] - sizes[case][1]}
    off = out["off"]["first_token_ms"]
    out["speedup_same_system"] = off / out["same_system"]["first_token_ms"]
    out["speedup_new_time"] = off / out["new_time"]["first_token_ms"]
    out["speedup_new_time_tolerant"] = off / out["new_time_tolerant"]["first_token_ms"]
    return out


def _first_turn(engine, task: str, system: str, answer_tokens: int) -> str:
    stream = engine.generate(task, TURN_1, options=ChatOptions(system=system, temperature=0.0),
                             max_new_tokens=answer_tokens)
    return "".join(stream)


def _second_turn_first_token(engine, task: str, system: str, answer: str) -> tuple[float, int, int]:
    """(seconds from the request to its first token, prompt tokens, prompt tokens taken from a cache)."""
    history = [Turn("user", TURN_1), Turn("assistant", answer)]
    started = time.perf_counter()
    stream = engine.generate(task, TURN_2, history, options=ChatOptions(system=system, temperature=0.0),
                             max_new_tokens=1)
    for _ in stream:
        break
    seconds = time.perf_counter() - started
    for _ in stream:  # let the loop finish (it keeps the conversation's KV)
        pass
    return seconds, stream.result.prompt_tokens, stream.result.cached_prefix_tokens
