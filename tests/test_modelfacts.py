"""Model facts from a config.json + safetensors files we write."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from llmqtt.modelfacts import ModelFactsError, read_model_facts
from safetensors.numpy import save_file


def tiny_qwen_config(tie: bool) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "tie_word_embeddings": tie, "torch_dtype": "bfloat16"}


def tiny_qwen_tensors(tie: bool) -> dict[str, np.ndarray]:
    h, kv, i, v = 32, 2 * 8, 64, 100
    tensors = {"model.embed_tokens.weight": np.zeros((v, h), np.float16), "model.norm.weight": np.zeros(h, np.float16)}
    for n in range(2):
        p = f"model.layers.{n}."
        tensors |= {p + "self_attn.q_proj.weight": np.zeros((h, h), np.float16),
                    p + "self_attn.q_proj.bias": np.zeros(h, np.float16),
                    p + "self_attn.k_proj.weight": np.zeros((kv, h), np.float16),
                    p + "self_attn.v_proj.weight": np.zeros((kv, h), np.float16),
                    p + "self_attn.o_proj.weight": np.zeros((h, h), np.float16),
                    p + "mlp.gate_proj.weight": np.zeros((i, h), np.float16),
                    p + "mlp.up_proj.weight": np.zeros((i, h), np.float16),
                    p + "mlp.down_proj.weight": np.zeros((h, i), np.float16),
                    p + "input_layernorm.weight": np.zeros(h, np.float16),
                    p + "post_attention_layernorm.weight": np.zeros(h, np.float16)}
    if not tie:
        tensors["lm_head.weight"] = np.zeros((v, h), np.float16)
    return tensors


def write_model(directory: Path, tie: bool, shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(tiny_qwen_config(tie)))
    items = sorted(tiny_qwen_tensors(tie).items())
    for s in range(shards):
        save_file(dict(items[s::shards]), str(directory / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    return directory


@pytest.mark.parametrize("shards", [1, 2])
def test_model_facts_untied(tmp_path: Path, shards: int) -> None:
    facts = read_model_facts(write_model(tmp_path / "m", tie=False, shards=shards))
    linear_per_layer = 32 * 32 * 2 + 16 * 32 * 2 + 64 * 32 * 3
    small_per_layer = 32 + 32 * 2  # q bias + two norms
    assert facts.param_count == 2 * (linear_per_layer + small_per_layer) + 100 * 32 * 2 + 32
    assert facts.unquantized_params == 2 * small_per_layer + 100 * 32 + 32  # embeddings, norms, biases
    assert facts.weight_bytes == facts.param_count * 2 and facts.stored_dtype == "F16"
    assert (facts.weight_files, facts.params_source) == (shards, "safetensors")
    assert (facts.hidden_size, facts.num_key_value_heads, facts.head_dim, facts.vocab_size) == (32, 2, 8, 100)
    assert facts.intermediate_size == 64 and facts.tie_word_embeddings is False


def test_model_facts_from_config_alone_match_the_files(tmp_path: Path) -> None:
    with_files = read_model_facts(write_model(tmp_path / "m", tie=True))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(tiny_qwen_config(tie=True)))
    config_only = read_model_facts(tmp_path / "c")
    assert config_only.params_source == "config" and config_only.weight_files == 0
    biases = 2 * 32  # config arithmetic does not know Qwen2 has q/k/v biases (here only q)
    assert config_only.param_count == with_files.param_count - biases


def test_model_facts_nested_text_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": tiny_qwen_config(True)}))
    facts = read_model_facts(tmp_path)
    assert facts.model_type == "gemma3" and facts.hidden_size == 32


def test_model_facts_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFactsError, match="config.json"):
        read_model_facts(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelFactsError, match="num_attention_heads"):
        read_model_facts(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_qwen_config(True)))
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ModelFactsError, match="bad.safetensors"):
        read_model_facts(tmp_path)


def test_model_facts_hand_written_header(tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "lm_head.weight": {"dtype": "BF16", "shape": [100, 32], "data_offsets": [0, 6400]}}).encode()
    (tmp_path / "config.json").write_text(json.dumps(tiny_qwen_config(False)))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(6400))
    facts = read_model_facts(tmp_path)
    assert (facts.param_count, facts.unquantized_params, facts.weight_bytes) == (3200, 0, 6400)
