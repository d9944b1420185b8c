"""Learned heads on the tiny random model: states, fit -> save -> load -> serve, fallbacks, bad data files."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from llmqtt import cli
from llmqtt.config import ModelConfig
from llmqtt.engine import load_engine
from llmqtt.engine.head import Features, Head, fit_temperature, load_head, logistic_regression
from llmqtt.engine import headfile
from llmqtt.engine.headfile import head_path, head_paths, read_meta, serves_under
from llmqtt.fit import FitDataError, read_rows
from llmqtt.tasks import load_tasks

TASK = """\
kind: classify
system: "You are a sentiment classifier. Answer with one word: positive or negative."
user_template: "Text: {text}"
labels: {positive: positive, negative: negative}
examples:
  - {text: "I love it", label: positive}
  - {text: "I hate it", label: negative}
"""
GOOD = ["I love this product", "it is great", "The food was good", "great, I love it", "good good good",
        "这个酒店很好", "服务非常好", "love it, great"]
BAD = ["This is terrible", "I hate it", "terrible food", "I hate this, terrible", "bad bad bad",
       "太差了", "再也不来了", "hate it, terrible"]


def rows(n: int, seed: int = 0) -> list[dict]:
    """Texts built from 'good' or 'bad' words: the random model's states separate them by token identity."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        words = rng.sample(GOOD if label == "positive" else BAD, 2)
        out.append({"text": " ".join(words), "label": label})
    return out


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """A prompts dir with the task, a config file pointing at the tiny model, and 60 labelled rows."""
    root = tmp_path_factory.mktemp("head")
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "mood.yaml").write_text(TASK, encoding="utf-8")
    config = root / "config.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}, dtype: float32, quantize: none, cache_dir: {root / 'cache'}}}\n"
                      f"prompts: [{prompts}]\n", encoding="utf-8")
    data = root / "mood.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(60)), encoding="utf-8")
    return root, prompts, config, data


def engine_for(tiny_model_dir, prompts, tmp_path, heads=True):
    model = ModelConfig(name=str(tiny_model_dir), dtype="float32", quantize="none", cache_dir=tmp_path,
                        fast_decode=False)  # float32: the states must equal a plain forward exactly
    tasks = load_tasks([prompts])
    files = {"mood": head_paths(prompts / "mood.yaml")} if heads else None
    return load_engine(model, tasks, max_batch=4, heads=files)


def test_layer_states_equal_the_plain_forward_hidden_states(tiny_model_dir, setup, tmp_path):
    _, prompts, _, _ = setup
    scorer = engine_for(tiny_model_dir, prompts, tmp_path, heads=False)._scorers["mood"]
    texts = ["I love it", "This is terrible, I hate it. The food was bad."]
    ids = [scorer.rest_ids(t) for t in texts]
    states = scorer.layer_states(ids, Features(((1, "cue"), (1, "mean"))))  # batched, right-padded
    for i, rest in enumerate(ids):
        with torch.inference_mode():
            full = scorer.model.base_model(torch.tensor([scorer.prefix.ids + rest]), output_hidden_states=True)
        layer1 = full.hidden_states[1][0, -len(rest):]  # the rest tokens' outputs of decoder layer 1
        assert torch.allclose(states[(1, "cue")][i], layer1[-1], atol=1e-5)
        assert torch.allclose(states[(1, "mean")][i], layer1.mean(0), atol=1e-5)


def test_logistic_regression_and_temperature_recover_a_known_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    w, b = logistic_regression(x, y, 2, c=1.0)
    assert float(((x.double() @ w.T + b).argmax(-1) == y).double().mean()) > 0.97
    logits = torch.randn(2000, 2, generator=g) * 3
    labels = torch.distributions.Categorical(logits=logits / 2.0).sample()  # true temperature 2
    assert 1.6 < fit_temperature(logits, labels) < 2.5


def test_fit_save_load_serve(tiny_model_dir, setup, tmp_path, capsys):
    _, prompts, config, data = setup
    assert cli.main(["fit", "mood", str(data), "--test", str(data), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "cross-validated accuracy" in out and "on 60 held-out rows" in out and "with the head" in out
    path = head_path(prompts / "mood.yaml")
    meta = read_meta(path)
    assert meta["rows"] == 60 and meta["labels"] == ["positive", "negative"] and meta["cv_accuracy"] >= 0.9
    assert meta["scheme"] == "float32" and meta["task"] == "mood"

    engine = engine_for(tiny_model_dir, prompts, tmp_path)
    head = engine.head("mood")
    assert head is not None and head.meta["fingerprint"] == engine.weights
    texts = ["I love it, great", "I hate it, terrible", "good", "这个酒店很好"]
    results = engine.classify("mood", texts)
    scorer = engine._scorers["mood"]
    for text, result in zip(texts, results):
        x = head.features.pick(scorer.layer_states([scorer.rest_ids(text)], head.features))
        expected = head.probabilities(x)[0]
        assert set(result.scores) == {"positive", "negative"}
        assert result.scores["positive"] == pytest.approx(float(expected[0]), abs=1e-5)
        assert result.score == max(result.scores.values()) and sum(result.scores.values()) == pytest.approx(1)
    assert results[0].label == "positive" and results[1].label == "negative"

    assert cli.main(["tasks", "--config", str(config)]) == 0
    assert "mood" in (listing := capsys.readouterr().out) and "[head: " in listing and "cross-validated" in listing


def _fitted_head_and_a_second_prompts_dir(setup, tmp_path):
    """The mood head (fitted once per module) and an empty second prompts dir holding the same task file."""
    _, prompts, config, data = setup
    path = head_path(prompts / "mood.yaml")
    if not path.exists():
        assert cli.main(["fit", "mood", str(data), "--config", str(config)]) == 0
    other = tmp_path / "prompts"
    other.mkdir()
    (other / "mood.yaml").write_text(TASK, encoding="utf-8")
    return load_head(path), other


def _config_for(config, prompts, other, tmp_path):
    """The setup's config file with its prompts dir replaced by `other`."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config.read_text().replace(str(prompts), str(other)), encoding="utf-8")
    return cfg


def test_head_for_other_weights_is_ignored_with_a_warning(tiny_model_dir, setup, tmp_path, caplog, capsys):
    head, other = _fitted_head_and_a_second_prompts_dir(setup, tmp_path)
    foreign = Head(head.labels, head.features, head.weight, head.bias, {**head.meta, "fingerprint": "0" * 32})
    foreign.save(head_path(other / "mood.yaml"))
    with caplog.at_level(logging.WARNING):
        engine = engine_for(tiny_model_dir, other, tmp_path / "cache")
    assert engine.head("mood") is None
    assert "not using a learned head" in caplog.text and "other model weights" in caplog.text
    plain = engine_for(tiny_model_dir, other, tmp_path / "cache", heads=False)
    assert engine.classify("mood", ["I love it"]) == plain.classify("mood", ["I love it"])  # the prompt's answer

    _, prompts, config, _ = setup
    assert cli.main(["tasks", "--config", str(_config_for(config, prompts, other, tmp_path))]) == 0
    assert "for another model: ignored" in capsys.readouterr().out


def test_head_fitted_under_another_scheme_is_ignored(tiny_model_dir, setup, tmp_path, caplog, capsys):
    """A float32 head served on int8 weights (or the reverse) reads shifted states: prompt fallback."""
    head, other = _fitted_head_and_a_second_prompts_dir(setup, tmp_path)
    Head(head.labels, head.features, head.weight, head.bias, {**head.meta, "scheme": "float32+int8"}).save(
        head_path(other / "mood.yaml"))
    with caplog.at_level(logging.INFO):
        engine = engine_for(tiny_model_dir, other, tmp_path / "cache")
    assert engine.head("mood") is None
    assert "fitted under float32+int8, serving float32" in caplog.text
    _, prompts, config, _ = setup
    assert cli.main(["tasks", "--config", str(_config_for(config, prompts, other, tmp_path))]) == 0
    assert "fitted under float32+int8, this config computes float32: ignored" in capsys.readouterr().out


def test_a_task_with_heads_for_two_schemes_serves_the_one_that_fits(tiny_model_dir, setup, tmp_path, capsys):
    """`mood.head.safetensors` fitted under int8 and `mood.head.float32.safetensors` under float32 (how the
    shipped sentiment task serves a head under either default): a float32 engine picks the second."""
    head, other = _fitted_head_and_a_second_prompts_dir(setup, tmp_path)
    Head(head.labels, head.features, head.weight, head.bias, {**head.meta, "scheme": "float32+int8"}).save(
        head_path(other / "mood.yaml"))
    head.save(other / "mood.head.float32.safetensors")
    assert head_paths(other / "mood.yaml") == [other / "mood.head.safetensors", other / "mood.head.float32.safetensors"]
    engine = engine_for(tiny_model_dir, other, tmp_path / "cache")
    assert engine.head("mood") is not None and engine.head("mood").meta["scheme"] == "float32"
    _, prompts, config, _ = setup
    assert cli.main(["tasks", "--config", str(_config_for(config, prompts, other, tmp_path))]) == 0
    listing = capsys.readouterr().out
    assert "fitted under float32]" in listing and "ignored" not in listing


def test_which_schemes_a_head_serves_under(monkeypatch):
    assert serves_under("float32", "float32") and serves_under("float32+int8", "float32+int8")
    assert not serves_under("float32", "float32+int8") and not serves_under("float32+int8", "float32")
    assert not serves_under("float32", "bfloat16")
    # A scheme computing in float32 on the checkpoint's exact weights is declared equivalent in one place.
    monkeypatch.setattr(headfile, "FLOAT32_EQUIVALENT", frozenset({"float32", "float32+gguf"}))
    assert serves_under("float32", "float32+gguf") and serves_under("float32+gguf", "float32")
    assert not serves_under("float32+gguf", "float32+int8")


def test_head_is_ignored_when_the_prompt_changed(tiny_model_dir, setup, tmp_path, caplog):
    _, prompts, config, data = setup
    path = head_path(prompts / "mood.yaml")
    if not path.exists():
        assert cli.main(["fit", "mood", str(data), "--config", str(config)]) == 0
    other = tmp_path / "prompts"
    other.mkdir()
    (other / "mood.yaml").write_text(TASK.replace("one word", "a single word"), encoding="utf-8")
    load_head(path).save(head_path(other / "mood.yaml"))
    with caplog.at_level(logging.WARNING):
        assert engine_for(tiny_model_dir, other, tmp_path / "cache").head("mood") is None
    assert "prompt changed" in caplog.text


@pytest.mark.parametrize("content, code", [
    ("", "empty"),
    ("\n\n", "empty"),
    ('{"text": "a", "label": "positive"}\nnot json\n', "malformed_line"),
    ('{"text": "a"}\n', "malformed_line"),
    ('["a", "positive"]\n', "malformed_line"),
    ('{"text": "", "label": "positive"}\n', "malformed_line"),
    ('{"text": "a", "label": "urgent"}\n', "unknown_label"),
    ('{"text": "a", "label": "positive"}\n' * 10 + '{"text": "b", "label": "negative"}\n', "too_few_rows"),
])
def test_bad_data_files_give_coded_errors(tmp_path, content, code):
    data = tmp_path / "d.jsonl"
    data.write_text(content, encoding="utf-8")
    with pytest.raises(FitDataError) as caught:
        read_rows(data, ["positive", "negative"])
    assert caught.value.code == code and str(data) in str(caught.value)


def test_fit_cli_refuses_bad_data_before_loading_the_model(setup, tmp_path, capsys):
    _, _, config, _ = setup
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "positive"}\n{"text": "b", "label": "urgent"}\n', encoding="utf-8")
    assert cli.main(["fit", "mood", str(data), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown_label" in err and "line 2" in err and "'urgent'" in err
    assert cli.main(["fit", "nosuchtask", str(data), "--config", str(config)]) == 2
    assert cli.main(["fit", "mood", str(tmp_path / "missing.jsonl"), "--config", str(config)]) == 2
    assert "unreadable" in capsys.readouterr().err


@pytest.mark.real_model
@pytest.mark.parametrize("quantize, scheme", [("none", "float32"), ("int8", "float32+int8")])
def test_shipped_sentiment_heads_fit_the_demo_model_and_serve(demo_model, repo_root, tmp_path, quantize, scheme):
    """Each shipped head's fingerprint matches the demo model as this machine built it (so the fingerprint is
    stable across machines), the one for the scheme computed serves, and it answers clear cases in both
    languages: float32 (`model.quantize: none`) and x86's default int8."""
    prompts = repo_root / "prompts"
    model = ModelConfig(name=str(demo_model.path), dtype="float32", quantize=quantize, cache_dir=tmp_path,
                        fast_decode=False)
    engine = load_engine(model, {"sentiment": load_tasks([prompts])["sentiment"]},
                         heads={"sentiment": head_paths(prompts / "sentiment.yaml")})
    assert engine.head("sentiment") is not None and engine.head("sentiment").meta["scheme"] == scheme
    texts = {"Absolutely love it, works perfectly.": "positive", "Terrible, broke on day one.": "negative",
             "房间很干净，服务也很好。": "positive", "太差了，再也不会来了。": "negative"}
    for (text, gold), result in zip(texts.items(), engine.classify("sentiment", list(texts))):
        assert result.label == gold and sum(result.scores.values()) == pytest.approx(1)
