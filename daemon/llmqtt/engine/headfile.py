"""Where a task's learned head lives and what it says about itself, readable without importing torch
(`llmqtt tasks` lists heads in a fraction of a second). The head itself: engine/head.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HEAD_SUFFIX = ".head.safetensors"
META_KEY = "llmqtt_head"

# Compute schemes (Engine.dtype: "float32", "float32+int8", ...) whose hidden states equal float32's up to
# rounding, so a head fitted under one serves under any other. A scheme that quantizes activations or
# rounds weights differently from the checkpoint moves the states: the demo's float32 head lost 5.0 (en) /
# 3.2 (zh) points on int8 weights with int8 activations, falling below the prompt (docs/accuracy.md).
# A scheme that computes in float32 on exactly the checkpoint's weights (e.g. the GGUF's own blocks,
# dequantized in the kernel) belongs here.
FLOAT32_EQUIVALENT = frozenset({"float32"})


def head_path(task_file: Path) -> Path:
    """`prompts/sentiment.yaml` -> `prompts/sentiment.head.safetensors` (where `llmqtt fit` writes)."""
    return task_file.with_name(task_file.stem + HEAD_SUFFIX)


def head_paths(task_file: Path) -> list[Path]:
    """Every head a task carries, in the order they are tried: `sentiment.head.safetensors`, then
    `sentiment.head.<any name>.safetensors` sorted. One per compute scheme lets a shipped task serve a head
    under int8 (x86's default) and under float32 (`model.quantize: none`); the first that fits is used."""
    extra = sorted(task_file.parent.glob(f"{task_file.stem}.head.*{Path(HEAD_SUFFIX).suffix}"))
    return [path for path in [head_path(task_file), *extra] if path.is_file()]


def compute_scheme(dtype: str, quantize: str) -> str:
    """The name a head records for how the model computed its states: `float32`, `float32+int8`, ..."""
    return dtype if quantize == "none" else f"{dtype}+{quantize}"


def serves_under(fitted: str, serving: str) -> bool:
    """May a head fitted under compute scheme `fitted` serve under `serving`? The same scheme, or two whose
    hidden states are float32's up to rounding. The one rule; the engine and `llmqtt tasks` both ask it."""
    return fitted == serving or (fitted in FLOAT32_EQUIVALENT and serving in FLOAT32_EQUIVALENT)


def read_meta(path: Path) -> dict:
    """A head file's metadata from its safetensors header (8-byte length, then JSON); ValueError if unreadable."""
    try:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= 1_000_000:  # a head's header is a few hundred bytes
                raise ValueError("no safetensors header")
            header = json.loads(f.read(length))
        return json.loads(header["__metadata__"][META_KEY])
    except (OSError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a head file ({exc})") from None


def weights_fingerprint(model_dir: Path) -> str:
    """Identifies a model's weights by content, the same on every machine (no paths, no mtimes).

    Hashing 1-2 GB of weights would add seconds to every start on a Pi, so this hashes each weight file's
    name, size, safetensors header (every tensor's name, dtype, shape and offsets) and 16 samples of 64 KiB
    spread over the file (~1 MiB read): a fine-tuned, re-quantized or different checkpoint changes them.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin"))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            if path.suffix == ".safetensors":
                digest.update(f.read(8 + int.from_bytes(f.read(8), "little")))
            for i in range(16):
                f.seek(size * i // 16)
                digest.update(f.read(65536))
    return digest.hexdigest()[:32]
