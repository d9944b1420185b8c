"""Prefix KV caches on disk: a restart reuses them, and anything that could change their numbers recomputes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llmqtt.config import ModelConfig
from llmqtt.engine import load_engine
from llmqtt.engine.engine import Engine
from llmqtt.engine.kvprefix import KVPrefix
from llmqtt.engine.loader import load
from llmqtt.engine.prefixstore import PrefixStore, model_fingerprint
from llmqtt.tasks import parse_task

SENTIMENT = {"kind": "classify", "system": "Classify the sentiment. Answer positive or negative.",
             "labels": {"positive": "positive", "negative": "negative"},
             "examples": [{"text": "I love it", "label": "positive"}, {"text": "I hate it", "label": "negative"}]}
CHAT = {"kind": "generate", "system": "You are a helpful assistant.",
        "generation": {"max_new_tokens": 6, "temperature": 0.0, "repetition_penalty": 1.0}}
IDS = [5, 17, 42, 8, 99, 3]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir, "float32")


def tasks():
    return {"sentiment": parse_task(SENTIMENT, "t", "sentiment"), "chat": parse_task(CHAT, "t", "chat")}


def layers_of(prefix: KVPrefix) -> list[torch.Tensor]:
    cache = prefix.cache(1)
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def test_second_build_reads_the_same_numbers_from_disk(loaded, tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, "fp")
    first = KVPrefix(loaded.model, IDS, store)
    second = KVPrefix(loaded.model, IDS, store)
    assert (first.from_disk, second.from_disk) == (False, True)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    for a, b in zip(layers_of(first), layers_of(second)):
        assert torch.equal(a, b)


def test_engine_answers_the_same_from_a_disk_prefix(loaded, tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, "fp")
    fresh = Engine(loaded, tasks(), "tiny", "tiny", prefix_store=store)
    restarted = Engine(loaded, tasks(), "tiny", "tiny", prefix_store=store)
    assert restarted._scorers["sentiment"].prefix.from_disk and restarted._generators["chat"].prefix.from_disk
    texts = ["good food", "这个酒店很差", "meh"]
    assert [r.scores for r in fresh.classify("sentiment", texts)] == \
        [r.scores for r in restarted.classify("sentiment", texts)]
    assert "".join(fresh.generate("chat", "Hi there")) == "".join(restarted.generate("chat", "Hi there"))


def test_other_fingerprint_or_ids_recompute(loaded, tmp_path: Path) -> None:
    KVPrefix(loaded.model, IDS, PrefixStore(tmp_path, "fp-a"))
    assert not KVPrefix(loaded.model, IDS, PrefixStore(tmp_path, "fp-b")).from_disk
    assert not KVPrefix(loaded.model, IDS + [7], PrefixStore(tmp_path, "fp-a")).from_disk
    assert KVPrefix(loaded.model, IDS, PrefixStore(tmp_path, "fp-a")).from_disk


def test_fingerprint_follows_weights_dtype_and_quantization(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    copy.mkdir()
    for f in tiny_model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    base = model_fingerprint(copy, "float32", "none")
    assert base == model_fingerprint(copy, "float32", "none")
    assert base != model_fingerprint(copy, "bfloat16", "none")
    assert base != model_fingerprint(copy, "float32", "int8")
    weights = next(copy.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # e.g. a re-converted model
    assert base != model_fingerprint(copy, "float32", "none")


def test_torn_file_is_recomputed_and_replaced(loaded, tmp_path: Path, caplog) -> None:
    store = PrefixStore(tmp_path, "fp")
    good = layers_of(KVPrefix(loaded.model, IDS, store))
    path = next(tmp_path.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])  # e.g. power lost mid-write on a filesystem without ordering
    again = KVPrefix(loaded.model, IDS, store)
    assert not again.from_disk and "ignoring prefix cache" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(good, layers_of(again)))
    assert KVPrefix(loaded.model, IDS, store).from_disk


def test_unwritable_store_still_serves(loaded, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    prefix = KVPrefix(loaded.model, IDS, PrefixStore(blocker / "prefix-kv", "fp"))
    assert not prefix.from_disk and prefix.length == len(IDS)
    assert "could not keep the prefix cache" in caplog.text
    assert not list(tmp_path.glob("**/*.tmp"))


def test_least_recently_used_files_go_over_the_size_limit(loaded, tmp_path: Path) -> None:
    one = PrefixStore(tmp_path, "fp")
    KVPrefix(loaded.model, IDS, one)
    size = next(tmp_path.glob("*.safetensors")).stat().st_size
    small = PrefixStore(tmp_path, "fp", max_bytes=int(2.5 * size))
    for n in range(1, 4):  # three more prefixes of the same size: the oldest file goes
        KVPrefix(loaded.model, [*IDS[:-1], 100 + n], small)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not KVPrefix(loaded.model, IDS, small).from_disk


def test_load_engine_keeps_prefixes_in_the_cache_dir_unless_turned_off(tiny_model_dir, tmp_path: Path) -> None:
    config = ModelConfig(name=str(tiny_model_dir), dtype="float32", cache_dir=tmp_path)
    load_engine(config, tasks())
    assert len(list((tmp_path / "prefix-kv").glob("*.safetensors"))) == 2  # one per task
    again = load_engine(config, tasks())
    assert again._scorers["sentiment"].prefix.from_disk
    off = load_engine(config.model_copy(update={"prefix_cache": False}), tasks())
    assert not off._scorers["sentiment"].prefix.from_disk
