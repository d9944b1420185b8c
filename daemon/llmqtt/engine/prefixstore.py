"""Prefix KV caches kept on disk, so a restart skips recomputing every task's system prompt and examples.

Building the prefixes is most of start-up after the load itself (a few seconds here, far more on a Pi).
A file holds one prefix's keys and values for one exact model build: its name hashes the token ids with the
model's fingerprint (checkpoint files' sizes and mtimes, dtype, quantization, torch and transformers
versions), so any change recomputes instead of reusing stale numbers. Writing is best effort: a read-only or
full disk only costs start-up time, never a request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): [1, kv_heads, P, head_dim]
MAX_BYTES = 256 * 1024 * 1024  # the whole store; least recently used files go first


class PrefixStore:
    def __init__(self, directory: Path, fingerprint: str, max_bytes: int = MAX_BYTES):
        self.directory, self.fingerprint, self.max_bytes = directory, fingerprint, max_bytes

    def load(self, ids: list[int]) -> Layers | None:
        path = self._path(ids)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            layers = [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(len(tensors) // 2)]
            if not layers or any(k.shape[2] != len(ids) or v.shape[2] != len(ids) for k, v in layers):
                raise ValueError("prefix length does not match")
            os.utime(path)  # mark as recently used for eviction
            return layers
        except Exception as exc:  # a torn or foreign file: recompute, and overwrite it
            log.warning("ignoring prefix cache %s: %s", path, exc)
            return None

    def save(self, ids: list[int], layers: Layers) -> None:
        path = self._path(ids)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {}
            for i, (keys, values) in enumerate(layers):
                tensors[f"k.{i}"], tensors[f"v.{i}"] = keys.contiguous(), values.contiguous()
            save_file(tensors, tmp, metadata={"tokens": str(len(ids))})
            tmp.replace(path)  # atomic: a reader sees the old file or the whole new one
            self._evict(keep=path)
        except Exception as exc:  # best effort: never fail a start over a cache
            log.warning("could not keep the prefix cache on disk (%s); start-up will recompute it", exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _path(self, ids: list[int]) -> Path:
        digest = hashlib.sha256(json.dumps([self.fingerprint, ids]).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.safetensors"

    def _evict(self, keep: Path) -> None:
        files = [(path, path.stat()) for path in self.directory.glob("*.safetensors")]
        total = 0
        for path, stat in sorted(files, key=lambda f: f[1].st_mtime, reverse=True):  # newest first
            total += stat.st_size
            if total > self.max_bytes and path != keep:
                path.unlink(missing_ok=True)


def model_fingerprint(model_dir: Path, dtype: str, quantize: str) -> str:
    """Changes whenever the numbers a prefix cache holds could change."""
    import transformers

    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    parts = [str(Path(model_dir).resolve()), stamp, dtype, quantize, torch.__version__, transformers.__version__]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
