"""Read a model directory's numbers: what memory planning needs, from config.json and the safetensors
headers only (no torch, no weights read). Frozen values for `planner.py`."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class ModelFactsError(ValueError):
    """A model directory whose config.json or safetensors headers cannot be read."""


@dataclass(frozen=True)
class ModelFacts:
    """The numbers memory planning needs, read from config.json and the safetensors headers only."""

    model_type: str | None
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int | None
    tie_word_embeddings: bool
    param_count: int
    # Parameters that stay at the compute dtype under int8: embeddings, norms, biases (not Linear weights).
    unquantized_params: int
    weight_bytes: int  # bytes on disk of all tensors (0 when only config.json was found)
    stored_dtype: str | None  # most common tensor dtype in the files, e.g. "BF16"
    weight_files: int
    params_source: Literal["safetensors", "config"]


def read_model_facts(model_dir: Path) -> ModelFacts:
    model_dir = Path(model_dir)
    config = _read_model_config(model_dir / "config.json")
    files = sorted(model_dir.glob("*.safetensors"))
    tensors = [t for f in files for t in _safetensors_tensors(f).items()]
    arch = _architecture(config)
    if tensors:
        counts = _count_tensors(tensors, arch["vocab_size"])
        source: Literal["safetensors", "config"] = "safetensors"
    else:
        counts = _count_from_config(arch)
        source = "config"
    return ModelFacts(**arch, **counts, weight_files=len(files), params_source=source)


def facts_from_config(config: dict) -> ModelFacts:
    """Facts for a model known only by its config.json numbers (a built-in model not fetched yet)."""
    arch = _architecture({"_path": "config", **config})
    return ModelFacts(**arch, **_count_from_config(arch), weight_files=0, params_source="config")


def _architecture(config: dict) -> dict:
    hidden, heads = _required(config, "hidden_size"), _required(config, "num_attention_heads")
    return dict(
        model_type=config.get("model_type"),
        hidden_size=hidden,
        num_hidden_layers=_required(config, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab_size=_required(config, "vocab_size"),
        intermediate_size=config.get("intermediate_size"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _read_model_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFactsError(f"{path}: cannot read: {exc}") from None
    if not isinstance(config, dict):
        raise ModelFactsError(f"{path}: not a JSON object")
    # Multimodal configs (Gemma 3, Qwen2-VL...) keep the language model's numbers in text_config.
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        text = config["text_config"]
        config = {**config, **text, "model_type": config.get("model_type") or text.get("model_type")}
    config["_path"] = str(path)
    return config


def _required(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ModelFactsError(f"{config['_path']}: `{key}` missing or not a positive integer")
    return value


def _safetensors_tensors(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file: u64 little-endian length, then that many bytes of JSON."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:  # real headers are kilobytes; this is not a safetensors file
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelFactsError(f"{path}: not a readable safetensors file: {exc}") from None
    return {name: info for name, info in header.items() if name != "__metadata__"}


def _count_tensors(tensors: list[tuple[str, dict]], vocab_size: int) -> dict:
    params = unquantized = size = 0
    dtypes: Counter[str] = Counter()
    for name, info in tensors:
        shape = info.get("shape") or []
        n = math.prod(shape)
        params += n
        start, end = info.get("data_offsets", (0, 0))
        size += end - start
        dtypes[info.get("dtype", "?")] += n
        if not _is_linear_weight(name, shape, vocab_size):
            unquantized += n
    return dict(param_count=params, unquantized_params=unquantized, weight_bytes=size,
                stored_dtype=dtypes.most_common(1)[0][0] if dtypes else None)


def _is_linear_weight(name: str, shape: list[int], vocab_size: int) -> bool:
    # torch's dynamic int8 replaces nn.Linear (lm_head included) but leaves nn.Embedding alone.
    is_embedding = "embed" in name or "wte" in name or ("lm_head" not in name and vocab_size in shape)
    return len(shape) == 2 and name.endswith("weight") and not is_embedding


def _count_from_config(arch: dict) -> dict:
    """Decoder-only transformer arithmetic for a directory without weights yet (Llama/Qwen2-like)."""
    h, v, hd = arch["hidden_size"], arch["vocab_size"], arch["head_dim"]
    q, kv = arch["num_attention_heads"] * hd, arch["num_key_value_heads"] * hd
    intermediate = arch["intermediate_size"] or 4 * h
    per_layer_linear = h * q + 2 * h * kv + q * h + 3 * h * intermediate
    linear = arch["num_hidden_layers"] * per_layer_linear + (0 if arch["tie_word_embeddings"] else v * h)
    unquantized = v * h + arch["num_hidden_layers"] * 2 * h + h  # embeddings + two norms a layer + final norm
    return dict(param_count=linear + unquantized, unquantized_params=unquantized, weight_bytes=0,
                stored_dtype=None)
