"""Home Assistant's template rules for tests that do not start it.

HA renders templates in its TemplateEnvironment, a subclass of jinja2's ImmutableSandboxedEnvironment: the
sandbox's `range` refuses more than MAX_RANGE (100,000) items and nothing may mutate a list or dict. Some
templates (the MQTT trigger's `topic` and `payload`, trigger variables) are "limited": `now()` and state
access are refused there. This module gives the same environment with the few HA names our templates use;
the real-HA tests (test_homeassistant_real.py) render everything once more in Home Assistant itself.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

assert MAX_RANGE == 100_000  # HA's limit is jinja2's; a change here would change what HA accepts


def _to_json(value: Any, ensure_ascii: bool = False, pretty_print: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=2 if pretty_print else None, sort_keys=sort_keys)


def _refused(name: str):
    def call(*args: Any, **kwargs: Any) -> Any:
        raise TemplateError(f"Use of '{name}' is not supported in limited templates")
    return call


def environment(*, limited: bool = False) -> ImmutableSandboxedEnvironment:
    """Strict about undefined names (HA only warns; a test should fail instead)."""
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
    env.filters["to_json"] = _to_json
    env.filters["from_json"] = json.loads
    env.globals["now"] = _refused("now") if limited else (lambda: datetime.now(timezone.utc).astimezone())
    env.globals["utcnow"] = _refused("utcnow") if limited else (lambda: datetime.now(timezone.utc))
    return env


def render(template: str, *, limited: bool = False, **variables: Any) -> str:
    return environment(limited=limited).from_string(template).render(**variables)


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def templates_in(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every (path, template string) in a YAML/JSON tree."""
    if isinstance(node, dict):
        return [found for key, value in node.items() for found in templates_in(value, f"{path}.{key}")]
    if isinstance(node, list):
        return [found for i, value in enumerate(node) for found in templates_in(value, f"{path}[{i}]")]
    return [(path, node)] if is_template(node) else []
