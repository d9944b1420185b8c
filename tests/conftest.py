from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from broker import acl_broker, broker, secure_broker, start_daemon  # noqa: E402,F401 - broker fixtures for every module
from ha.server import ha_broker, home_assistant  # noqa: E402,F401 - a real Home Assistant for the session
from tinymodel import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# llmqtt's int8 kernel is built once per machine into TORCH_EXTENSIONS_DIR (a daemon: <cache_dir>/kernels).
# Tests start daemons and engines on fresh cache dirs; they share one build here (inherited by subprocesses)
# instead of compiling it again (~15 s) in each.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llmqtt-test" / "kernels"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 model + tokenizer saved as a Hugging Face directory (built once per run). Daemons
    started on it with the default cache store its quantized weights and compiled decode steps in
    ~/.cache/llmqtt: removed after (the steps: those that appeared during the run; their names are hashes)."""
    from llmqtt.engine.modelstore import default_cache_dir
    from llmqtt.engine.quantstore import QuantizedStore

    steps = default_cache_dir() / "decode"
    steps_before = set(steps.glob("*.step"))
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))
    yield model_dir
    store = QuantizedStore(default_cache_dir() / "quantized")
    for scheme in ("int8", "int4"):
        for path in store.directory.glob(f"{store._prefix(model_dir, scheme)}-*.safetensors"):
            path.unlink(missing_ok=True)
    for path in set(steps.glob("*.step")) - steps_before:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_model():
    """The real demo model (Qwen2.5-Coder-0.5B-Instruct), fetched and converted on first use."""
    from llmqtt.config import ModelConfig
    from llmqtt.engine.modelstore import resolve_model

    return resolve_model(ModelConfig(name="demo", auto_fetch=True))


@pytest.fixture(scope="session")
def demo_engine(demo_model):
    """The demo model loaded with the shipped prompts, as `llmqtt run` would (fp32, explicit)."""
    from llmqtt.engine.engine import Engine
    from llmqtt.engine.loader import load
    from llmqtt.tasks import load_tasks

    loaded = load(demo_model.path, "float32")
    return Engine(loaded, load_tasks([REPO / "prompts"]), demo_model.display_name, demo_model.match_name)
