"""The quantized weights' store and int8 packing: torch, safetensors and the mapped file only, no
transformers, so a start can open the stored file and have fbgemm pack it while transformers' modules are
imported (`EarlyPacking`: ~2.5 s of imports on the bench machine that used to come before any packing).
The model around the weights: quantize.py."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import OUR_INT8_KERNEL
from . import kernels
from .mapped import MappedFile

log = logging.getLogger(__name__)

# Rows packed per fbgemm call. Packing copies its input twice over (a quantized tensor, then fbgemm's
# layout): the demo's 151,936-row output head in one piece raised the load's peak RSS by 0.41 GB for a
# 0.14 GB matrix; in pieces of 16,384 rows the transient is ~15 MB. Decode then calls fbgemm 10 times
# for the head instead of once (each call re-quantizes one 896-float row: microseconds).
PACK_ROWS = 16384


def pack_rows(qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              packed_rows=lambda first, stop: None) -> list:
    """fbgemm's packed copy of int8 W ([out, in], per-row `scale`), PACK_ROWS rows a piece, telling
    `packed_rows(first, stop)` as each piece is done. Runs outside the GIL (fbgemm), so a thread can pack
    while the main one imports transformers' model code."""
    pieces = []
    for first in range(0, qdata.shape[0], PACK_ROWS):
        stop = min(first + PACK_ROWS, qdata.shape[0])
        zeros = torch.zeros(stop - first, dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(qdata[first:stop], scale[first:stop].double(), zeros, 0)
        pieces.append(torch.ops.quantized.linear_prepack(weight, None if bias is None else bias[first:stop].contiguous()))
        packed_rows(first, stop)
    return pieces


# Linears that read the same input, packed as one product each. A decode step's fbgemm call costs ~90 µs
# beyond its bytes (it quantizes the input row and starts its threads per call): packing q/k/v and gate/up
# together took a demo-sized step from 169 products to 97, and its 24 layers from 25 to 18.5 ms (random
# int8 weights of the demo's shapes, 2 threads, medians of 7 interleaved, 2026-11-29). quantize.py's
# fused forwards (engine/fused.py) take the place of the model code's for these model types.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_MODEL_TYPES = ("qwen2",)


def fuses(model_dir: Path) -> bool:
    """Whether the model's Linears are packed in FUSED groups (its config.json's model_type)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") in FUSED_MODEL_TYPES
    except (OSError, ValueError):
        return False


def fused_groups(names: list[str]) -> dict[str, list[str]]:
    """Fused Linear name -> its members' names, for every complete FUSED group among the Linear `names`:
    ["l.0.mlp.gate_proj", "l.0.mlp.up_proj", ...] -> {"l.0.mlp.gate_up_proj": [those two], ...}."""
    present, groups = set(names), {}
    for name in names:
        parent, _, child = name.rpartition(".")
        for fused, members in FUSED.items():
            full = [f"{parent}.{member}" for member in members]
            if child == members[0] and present.issuperset(full):
                groups[f"{parent}.{fused}"] = full
    return groups


def block_rows(qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               copied_rows=lambda first, stop: None) -> kernels.Blocked:
    """llmqtt's AVX2 kernel's copy of int8 W ([out, in], per-row `scale`): blocked rows, row sums."""
    blocked = kernels.block(qdata, PACK_ROWS, copied_rows)
    return kernels.Blocked(blocked, scale.clone(), kernels.row_sums(blocked, len(qdata)),
                           None if bias is None else bias.clone())


def pack_stored(source, fuse: bool = False, workers: int = 1, blocked: bool = False) -> dict[str, list | kernels.Blocked]:
    """Every stored int8 Linear (all but the embedding table) packed, its file pages released as it goes:
    Linear name -> fbgemm's pieces, or with `blocked` the AVX2 kernel's copy (kernels.Blocked); with `fuse`,
    each FUSED group as one product under its fused name. fbgemm packs on one core (~140 MB/s, 3.1 s for
    the demo), so `workers` threads pack Linears side by side."""
    names = [k[:-len(".qdata")] for k in source.keys() if k.endswith(".qdata") and not k.endswith("table.qdata")]
    groups = fused_groups(names) if fuse else {}
    in_groups = {member for members in groups.values() for member in members}
    pack = block_rows if blocked else pack_rows
    jobs = {fused: functools.partial(_pack_together, source, members, pack) for fused, members in groups.items()}
    jobs.update({name: functools.partial(_pack_one, source, name, pack) for name in names if name not in in_groups})
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmqtt-pack") as pool:
        return dict(zip(jobs, pool.map(lambda job: job(), jobs.values())))


def _pack_one(source, name: str, pack=pack_rows) -> list | kernels.Blocked:
    return pack(source.view(f"{name}.qdata"), source.view(f"{name}.scale"), _bias(source, name),
                lambda first, stop: source.release(f"{name}.qdata", first, stop))


def _pack_together(source, members: list[str], pack=pack_rows) -> list | kernels.Blocked:
    """One product of the members' rows stacked in order (a few MB copied: the demo's gate/up is 8.7 MB)."""
    biases = [_bias(source, name) for name in members]
    if any(b is not None for b in biases):  # a member without a bias adds zeros
        biases = [b if b is not None else torch.zeros(source.view(f"{name}.scale").shape[0])
                  for b, name in zip(biases, members)]
    pieces = pack(torch.cat([source.view(f"{name}.qdata") for name in members]),
                  torch.cat([source.view(f"{name}.scale") for name in members]),
                  torch.cat(biases) if biases[0] is not None else None)
    for name in members:
        source.release(f"{name}.qdata")
    return pieces


def _bias(source, name: str) -> torch.Tensor | None:
    return source.view(f"{name}.bias") if f"{name}.bias" in source.keys() else None


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def hand_freed_blocks_back(trim: bool = False) -> None:
    """Packing allocates and frees 1-17 MB temporaries per layer. glibc raises its mmap threshold after
    large frees (up to 32 MB), so later temporaries come from the heap and stay there once freed: on the
    demo model that held 0.14 GB more once ready and raised the peak by 0.16 GB (2026-11-29). A fixed 1 MB
    threshold maps every larger block on its own and unmaps it when freed; `trim` returns the heap's free
    tail. glibc only: elsewhere (musl) nothing is done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class QuantizedStore:
    """`<cache>/quantized/<model>-<scheme>-<fingerprint>.safetensors`: one file per model, scheme and build;
    a newer build replaces the older file of the same model and scheme."""

    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, model_dir: Path, scheme: str) -> Path:
        return self.directory / f"{self._prefix(model_dir, scheme)}-{fingerprint(model_dir, scheme)}.safetensors"

    @staticmethod
    def _prefix(model_dir: Path, scheme: str) -> str:
        where = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:12]
        return f"{Path(model_dir).resolve().parent.name}-{where}-{scheme}"

    def load(self, model_dir: Path, scheme: str) -> MappedFile | None:
        path = self.path(model_dir, scheme)
        if not path.is_file():
            return None
        try:
            return MappedFile(path)
        except Exception as exc:  # torn or foreign: quantize again
            log.warning("ignoring quantized weights %s: %s", path, exc)
            return None

    def save(self, model_dir: Path, scheme: str, state: dict[str, torch.Tensor]) -> Path | None:
        path = self.path(model_dir, scheme)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for old in path.parent.glob(f"{self._prefix(model_dir, scheme)}-*.safetensors"):  # an older build
                old.unlink(missing_ok=True)
            save_file(state, tmp, metadata={"scheme": scheme})
            tmp.replace(path)  # atomic: a reader sees no file or the whole file
            return path
        except Exception as exc:  # best effort: the next start quantizes again
            log.warning("could not keep the quantized weights on disk (%s)", exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return None


DROPPED = "float32-dropped.json"  # the float32 files' stamps, once model.keep_float32: false removed them


# The stored layout's version per scheme, named in the fingerprint once past 1. int4 2: an untied model's
# embedding is an int8 row table (was float32: 0.54 GB of a Pi's memory for the demo model).
LAYOUT = {"int8": 1, "int4": 2}


def fingerprint(model_dir: Path, scheme: str) -> str:
    """Changes whenever the stored numbers could: the model files, the scheme, the libraries, the layout."""
    layout = [LAYOUT[scheme]] if LAYOUT.get(scheme, 1) > 1 else []
    return hashlib.sha256(json.dumps([model_stamp(model_dir), scheme, torch.__version__, _version("transformers"),
                                      _version("torchao"), *layout]).encode()).hexdigest()[:24]


def model_stamp(model_dir: Path) -> list:
    """(name, size, mtime) of the model's weight and JSON files; dropped float32 files by their record."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".json") and p.name != DROPPED)
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    dropped = Path(model_dir) / DROPPED
    if dropped.is_file():
        stamp += json.loads(dropped.read_text())
    return sorted(stamp)


def drop_float32(model_dir: Path) -> int:
    """Delete the float32 safetensors of a converted model (its quantized copy is stored); bytes freed.
    Only for directories llmqtt converted itself (demo, a .gguf): never a user's own model files."""
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    if not weights:
        return 0
    record = Path(model_dir) / DROPPED
    previous = json.loads(record.read_text()) if record.is_file() else []
    record.write_text(json.dumps(previous + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]))
    freed = 0
    for path in weights:
        freed += path.stat().st_size
        path.unlink()
    log.info("dropped the float32 weights of %s (%.1f GB; model.keep_float32: false)", model_dir, freed / 1e9)
    return freed


def float32_dropped_error(model_dir: Path) -> RuntimeError:
    return RuntimeError(f"the float32 weights in {model_dir} were dropped (model.keep_float32: false); delete that "
                        "directory to convert the model again, or keep the quantized default")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class EarlyPacking:
    """Packing every int8 Linear of a stored model on a thread of its own, started as early as the file is
    known: before transformers' modules are imported (they hold the GIL; packing releases it). The thread
    first loads llmqtt's AVX2 kernel (kernels.load: built the first time, ~15 s); fbgemm packs where it
    can't serve (`kernel` says which served, `why_fbgemm` why not ours)."""

    def __init__(self, source: MappedFile, fuse: bool, workers: int | None = None):
        hand_freed_blocks_back()  # before packing's first temporaries
        self.source, self.fuse = source, fuse
        self.why_fbgemm: str | None = None  # set on the packing thread, before `packed` is done
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmqtt-packing")
        self.packed: Future = pool.submit(self._pack, workers or torch.get_num_threads())
        pool.shutdown(wait=False)  # the thread ends with its one job

    def _pack(self, workers: int) -> dict:
        self.why_fbgemm = kernels.load()
        return pack_stored(self.source, self.fuse, workers, blocked=self.why_fbgemm is None)

    @property
    def kernel(self) -> str:
        """Which kernel the packed products are for (read once `packed` is done)."""
        return "fbgemm" if self.why_fbgemm else OUR_INT8_KERNEL

    @classmethod
    def start(cls, store: QuantizedStore, model_dir: Path, scheme: str) -> EarlyPacking | None:
        """Started if the stored int8 file is there and fbgemm can pack it; else None (load packs later)."""
        if scheme != "int8" or not has_fbgemm():
            return None
        stored = store.load(model_dir, scheme)
        return cls(stored, fuses(model_dir)) if stored is not None else None
