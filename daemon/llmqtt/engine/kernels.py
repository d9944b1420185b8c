"""llmqtt's own int8 product for x86 CPUs with AVX2 (int8_avx2.cpp): built once per machine with the C++
compiler torch.compile already needs, loaded as a torch op (`torch.ops.llmqtt_kernels.int8_mm`).

fbgemm stays the fallback: on a CPU without AVX2, where no compiler or ninja is installed, or if the build
fails. `load()` says which and why; `llmqtt doctor` and the bench show it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import INT8_KERNEL_TOOLS, choose_int8_kernel

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_avx2.cpp")
ROWS, DEPTH = 8, 4  # the blocked layout's rows per block and k per load (int8_avx2.cpp)
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for runs on torch's own thread pool

_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "why": None once loaded, else why not


def load() -> str | None:
    """Build (first time, ~15 s) or load the kernel; None when it serves, else why fbgemm does (the model's
    build logs which serves)."""
    with _lock:
        if "why" not in _state:
            _state["why"] = _load()
        return _state["why"]


def _load() -> str | None:
    if os.environ.get("LLMQTT_INT8_KERNEL", "") == "fbgemm":  # the bench's and tests' A/B switch
        return "LLMQTT_INT8_KERNEL=fbgemm"
    flags = {"avx2"} if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else set()
    kernel, why = choose_int8_kernel(platform.machine(), flags, {t for t in INT8_KERNEL_TOOLS if shutil.which(t)})
    if kernel == "fbgemm":
        return why
    # named by the source, torch and the flags: a changed kernel or torch builds anew beside the old one
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(FLAGS).encode())
    name = f"llmqtt_int8_{digest.hexdigest()[:12]}"
    directory = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions") / name
    built = directory / f"{name}.so"
    if built.is_file():  # every start after the first: no cpp_extension import, no ninja run (~0.3 s)
        try:
            torch.ops.load_library(str(built))
            return None
        except OSError as exc:  # torn by a crash mid-build: build again
            log.warning("rebuilding %s: %s", built, exc)
    try:
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(directory),
                           extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as exc:  # a compiler error, a read-only cache: fbgemm serves
        return f"building {SOURCE.name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


@dataclass(frozen=True)
class Blocked:
    """One int8 product for the kernel: W blocked [N/8, K/4, 8, 4], its per-row scales [N] and row sums
    [N] int32 (for the input's zero point), bias [N] or None."""

    weight: torch.Tensor
    scale: torch.Tensor
    sums: torch.Tensor
    bias: torch.Tensor | None


def block(qdata: torch.Tensor, chunk_rows: int = 16384, copied_rows=lambda first, stop: None) -> torch.Tensor:
    """int8 W [N, K] -> the kernel's layout [N/8, K/4, 8, 4] (zeros pad N and K up to whole blocks), copied
    `chunk_rows` (a multiple of 8) at a time and told to `copied_rows(first, stop)`, so a caller can release
    the source's pages as it goes (the demo's output head is 0.14 GB)."""
    n, k = qdata.shape
    blocks, depth = -(-n // ROWS), -(-k // DEPTH)
    blocked = torch.zeros(blocks, depth, ROWS, DEPTH, dtype=torch.int8)
    for first in range(0, n, chunk_rows):
        stop = min(first + chunk_rows, n)
        if k % DEPTH or (stop - first) % ROWS:  # a ragged edge (no built-in model's layer): via a padded copy
            padded = torch.zeros(-(-(stop - first) // ROWS) * ROWS, depth * DEPTH, dtype=torch.int8)
            padded[:stop - first, :k] = qdata[first:stop]
            rows = padded.view(torch.int32)
        else:
            rows = qdata[first:stop].view(torch.int32)
        # DEPTH int8 moved as one int32: 2.3x faster than moving bytes (69 vs 156 ms for the demo's head)
        blocked.view(torch.int32).view(blocks, depth, ROWS)[first // ROWS:first // ROWS + len(rows) // ROWS] = \
            rows.view(-1, ROWS, depth).transpose(1, 2)
        copied_rows(first, stop)
    return blocked


def row_sums(blocked: torch.Tensor, rows: int) -> torch.Tensor:
    """sum_k W[n, k] as int32 [rows], read from the blocked copy by the kernel (torch's int8 sum took 229 ms
    for the demo's head, this ~15)."""
    return torch.ops.llmqtt_kernels.int8_row_sums(blocked)[:rows].clone()


def product(x: torch.Tensor, blocked: torch.Tensor, scale: torch.Tensor, sums: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] float32 -> [..., N]."""
    return torch.ops.llmqtt_kernels.int8_mm(x, blocked, scale, sums, bias)
