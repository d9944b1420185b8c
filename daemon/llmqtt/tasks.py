"""Task files: `prompts/*.yaml` -> typed, validated task specs.

Pure data: no torch, no MQTT. One file is one task; adding a task is adding a file.
Errors name the file and the field (pydantic's location path).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .validation import describe

TASK_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class TaskFileError(ValueError):
    """A task file that cannot be used; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Example(_Strict):
    text: str = Field(min_length=1)
    label: str


class GenerationSettings(_Strict):
    max_new_tokens: int = Field(default=256, ge=1, le=8192)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)  # 0 = greedy
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # 0 = off
    repetition_penalty: float = Field(default=1.1, ge=1.0, le=3.0)
    seed: int | None = None


class HistoryLimits(_Strict):
    max_turns: int = Field(default=8, ge=0, description="user+assistant pairs kept per session")
    max_tokens: int = Field(default=1024, ge=0, description="token budget for kept history")


class _TaskBase(_Strict):
    name: str = Field(pattern=TASK_NAME_PATTERN)
    description: str = ""
    system: str = Field(min_length=1)
    # How the request text is wrapped in the user message; `{text}` is replaced.
    user_template: str = "{text}"

    @field_validator("user_template")
    @classmethod
    def _has_text_slot(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain {text}")
        return value

    @model_validator(mode="after")
    def _overrides_valid(self):
        for pattern, override in self.overrides.items():
            fixed = sorted(set(override) & {"name", "kind", "overrides"})
            if fixed:
                raise ValueError(f"overrides.{pattern}: cannot override {', '.join(fixed)}")
            try:
                _merged(self, override)
            except ValidationError as exc:
                raise ValueError(f"overrides.{pattern}: {_describe(exc, skip=0)}") from None
        return self

    def for_model(self, model_name: str):
        """This task with every override whose key (a case-insensitive glob) matches the model, in order."""
        merged = self
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatch(model_name.lower(), pattern.lower()):
                merged = _merged(merged, override)
        return merged

    def render_user(self, text: str) -> str:
        # str.replace, not str.format: user text may contain braces.
        return self.user_template.replace("{text}", text)


class ClassifyTask(_TaskBase):
    kind: Literal["classify"]
    # label name -> the word(s) the model should answer with; the first token of each word is scored.
    labels: dict[str, list[str]] = Field(min_length=2)
    examples: list[Example] = []
    # Per-label logit offsets added before the softmax (see docs: calibration).
    calibration: dict[str, float] = {}
    overrides: dict[str, dict[str, Any]] = {}

    @field_validator("labels", mode="before")
    @classmethod
    def _words_as_lists(cls, value: Any) -> Any:
        if isinstance(value, list):  # `labels: [positive, negative]` -> each label says its own name
            return {str(name): [str(name)] for name in value}
        if isinstance(value, dict):
            return {k: ([v] if isinstance(v, str) else (v or [k])) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _labels_consistent(self) -> ClassifyTask:
        for name, words in self.labels.items():
            if not words or any(not w.strip() for w in words):
                raise ValueError(f"labels.{name}: needs at least one non-empty word")
        known = set(self.labels)
        for i, ex in enumerate(self.examples):
            if ex.label not in known:
                raise ValueError(f"examples.{i}.label: {ex.label!r} is not one of {sorted(known)}")
        for name in self.calibration:
            if name not in known:
                raise ValueError(f"calibration.{name}: not a label (labels: {sorted(known)})")
        return self


class GenerateTask(_TaskBase):
    kind: Literal["generate"]
    generation: GenerationSettings = GenerationSettings()
    history: HistoryLimits = HistoryLimits()
    overrides: dict[str, dict[str, Any]] = {}


TaskSpec = Annotated[Union[ClassifyTask, GenerateTask], Field(discriminator="kind")]


class _TaskFile(BaseModel):
    task: TaskSpec


def _merged(task: Any, override: dict[str, Any]) -> Any:
    """Deep-merge an override into the task's fields and validate the result as the same kind of task."""
    base = task.model_dump(exclude={"overrides"})  # the merged task is final: it carries no overrides
    return type(task).model_validate(_deep_merge(base, override))


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_task(data: Any, source: str, default_name: str) -> ClassifyTask | GenerateTask:
    if not isinstance(data, dict):
        raise TaskFileError(f"{source}: a task file must be a YAML mapping")
    data = {"name": default_name, **data}
    try:
        return _TaskFile.model_validate({"task": data}).task
    except ValidationError as exc:
        raise TaskFileError(f"{source}: {_describe(exc)}") from None


def _describe(exc: ValidationError, skip: int = 2) -> str:
    # skip 2: the `_TaskFile.task` wrapper; the kind is the union's tag, not something the file spells out.
    return describe(exc, skip=skip, hide=("classify", "generate"))


def load_task_file(path: Path) -> ClassifyTask | GenerateTask:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TaskFileError(f"{path}: cannot read: {exc}") from None
    return parse_task(data, str(path), default_name=path.stem)


def load_tasks(dirs: list[Path]) -> dict[str, ClassifyTask | GenerateTask]:
    """All `*.yaml`/`*.yml` files in `dirs`; a later directory's task replaces an earlier one of the same name."""
    return {name: task for name, (_, task) in _load_all(dirs).items()}


def task_files(dirs: list[Path]) -> dict[str, Path]:
    """The file each task comes from (the one `load_tasks` keeps); a task's learned head sits beside it."""
    return {name: path for name, (path, _) in _load_all(dirs).items()}


def _load_all(dirs: list[Path]) -> dict[str, tuple[Path, ClassifyTask | GenerateTask]]:
    tasks: dict[str, tuple[Path, ClassifyTask | GenerateTask]] = {}
    for directory in dirs:
        if not directory.is_dir():
            raise TaskFileError(f"{directory}: prompts directory does not exist")
        for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
            task = load_task_file(path)
            tasks[task.name] = (path, task)
    if not tasks:
        raise TaskFileError(f"no task files (*.yaml) in {', '.join(map(str, dirs))}")
    return tasks


def bundled_prompts_dir() -> Path:
    """The prompts shipped with llmqtt: the repo's `prompts/` (editable install) or the wheel's copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_bundled" / "prompts", here.parents[1] / "prompts"):
        if candidate.is_dir():
            return candidate
    raise TaskFileError("llmqtt's bundled prompts directory is missing; set `prompts:` in the config")
