"""build.build_engine: the one path from config to a warm engine, with the fake engine as its load step,
and the command line's answer to a task file the model cannot serve (the tiny real model)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fake_engine import load_engine as fake_factory
from fake_engine import write_model_dir, write_prompts

from llmqtt.build import build_engine
from llmqtt.cli import main as cli_main
from llmqtt.config import Config
from llmqtt.explain import ModelTooLarge
from llmqtt.tasks import load_tasks


@pytest.fixture
def config(tmp_path) -> Config:
    return Config.model_validate({"model": str(write_model_dir(tmp_path / "model")),
                                  "prompts": [str(write_prompts(tmp_path / "prompts"))],
                                  "runtime": {"max_batch": 8, "threads": 1}})


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    """apply_threads sets OMP_NUM_THREADS & co. and, once torch is imported, torch's pool: put both back."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    yield
    if torch:
        torch.set_num_threads(threads)


def test_the_factory_gets_the_plan_and_the_engine_comes_back_warm(config):
    calls = []

    def factory(model_config, tasks, **kwargs):
        calls.append((model_config, kwargs))
        return fake_factory(model_config, tasks, **kwargs)

    warm = build_engine(config, load_tasks(config.prompt_dirs()), factory=factory)
    [(model_config, kwargs)] = calls
    assert model_config.dtype == "float32" == warm.plan.dtype  # `auto` resolved by the plan
    assert kwargs["max_batch"] == warm.plan.max_batch == warm.engine.max_batch == 8
    assert kwargs["resolved"].path == Path(config.model.name)
    assert warm.engine.warmed_up and warm.threads == 1 == warm.plan.threads
    # the building thread is done with the engine: it frees its OpenMP threads for the service's worker
    assert warm.engine.idle_threads == [threading.current_thread().name]
    assert os.environ["OMP_NUM_THREADS"] == "1"  # the plan was put into effect before loading
    assert warm.memory.threshold_bytes == warm.plan.low_memory_bytes


def test_warm_up_follows_the_config_unless_told(config):
    tasks = load_tasks(config.prompt_dirs())
    assert not build_engine(config, tasks, factory=fake_factory, warm=False).engine.warmed_up
    quiet = config.model_copy(update={"runtime": config.runtime.model_copy(update={"warmup": False})})
    assert not build_engine(quiet, tasks, factory=fake_factory).engine.warmed_up


def test_a_model_that_cannot_fit_is_refused_before_loading(config, tmp_path):
    huge = write_model_dir(tmp_path / "huge", hidden_size=32768, num_hidden_layers=400, intermediate_size=131072,
                           vocab_size=256000)
    config = config.model_copy(update={"model": config.model.model_copy(update={"name": str(huge)})})
    loaded = []
    with pytest.raises(ModelTooLarge, match="does not fit|needs"):
        build_engine(config, load_tasks(config.prompt_dirs()), factory=lambda *a, **k: loaded.append(1))
    assert loaded == []


def test_ask_with_a_fake_engine_goes_through_the_same_path(config, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(f"model: {config.model.name}\nprompts: [{config.prompts[0]}]\n", encoding="utf-8")
    assert cli_main(["ask", "sentiment", "I love it", "--config", str(path)], engine_factory=fake_factory) == 0
    assert '"label": "positive"' in capsys.readouterr().out


CLASH = """\
kind: classify
system: "Classify."
labels: {a: xqz, b: xqy}
"""


@pytest.fixture
def clash_config(tiny_model_dir, tmp_path) -> Path:
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "clash.yaml").write_text(CLASH, encoding="utf-8")
    path = tmp_path / "config.yaml"
    path.write_text(f"model: {{name: {tiny_model_dir}, cache_dir: {tmp_path / 'cache'}, fast_decode: false}}\n"
                    f"prompts: [{prompts}]\nmqtt: {{port: 1}}\nhomeassistant: {{enabled: false}}\n"
                    "logging: {format: text}\n", encoding="utf-8")
    return path


def test_ask_says_in_one_line_that_the_labels_clash(clash_config, capsys):
    assert cli_main(["ask", "clash", "hello", "--config", str(clash_config)]) == 2
    err = capsys.readouterr().err  # after the progress lines: one line that says what to change
    assert err.splitlines()[-1].startswith("llmqtt: task 'clash': labels 'a' and 'b' both start with the token")
    assert "Traceback" not in err, err


def test_run_refuses_the_task_file_with_exit_2_not_a_traceback(clash_config):
    """Exit 2 is a config error: systemd's Restart=on-failure plus RestartPreventExitStatus=2 stop there."""
    done = subprocess.run([sys.executable, "-m", "llmqtt", "run", "--config", str(clash_config)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("llmqtt: task 'clash': labels 'a' and 'b' both start")
    assert "Traceback" not in done.stderr
