"""Where a task's learned head lives and what it says about itself, readable without importing torch
(`llmqtt tasks` lists heads in a fraction of a second). The head itself: engine/head.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HEAD_SUFFIX = ".head.safetensors"
META_KEY = "llmqtt_head"


def head_path(task_file: Path) -> Path:
    """`prompts/sentiment.yaml` -> `prompts/sentiment.head.safetensors`."""
    return task_file.with_name(task_file.stem + HEAD_SUFFIX)


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
