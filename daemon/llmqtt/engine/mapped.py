"""A safetensors file mapped into memory, its tensors views of the mapping: only the pages a reader touches
are read, and `release` hands a tensor's pages back once it has been copied elsewhere.

Why not `safetensors.torch.load_file`: it maps the file too, but keeps the whole mapping alive for as long
as any one tensor of it lives. The quantized demo model's file is 0.63 GB; after fbgemm has packed its own
copy of every Linear layer, the pages read while packing stayed counted in the process's RSS (0.66 GB of
the 1.95 GB measured once ready, 2026-11-29 quick bench). Here every packed layer's pages are released as
it is packed, and the two tables read by rows (the input embedding and the output head's label rows) stay
on disk but for the rows a request looks up.

Pages of a file mapping are clean page cache: under memory pressure the kernel drops them and reads them
again when touched, where anonymous memory would have to be swapped (a Pi usually has no swap).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

# safetensors dtype names -> torch
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}


class MappedFile:
    """The tensors of one safetensors file, by name. Keep this object alive while any view is in use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(path, "rb") as f:
            # ACCESS_COPY (MAP_PRIVATE): writable views for torch, nothing ever written back to the file
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (header_len,) = struct.unpack("<Q", self._map[:8])
        header = json.loads(self._map[8:8 + header_len])
        self.metadata: dict = header.pop("__metadata__", {}) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + header_len
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end != len(self._map):
            raise ValueError(f"{path}: {len(self._map)} bytes, the header describes {self._data_start + end} (torn?)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a view of the mapping: nothing is read until it is touched."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        if count == 0:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._data_start + begin)
        return flat.view(entry["shape"])

    def copy(self, name: str) -> torch.Tensor:
        """The tensor in memory of its own (small tensors: norms, biases, scales), its pages released."""
        tensor = self.view(name).clone()
        self.release(name)
        return tensor

    def release(self, name: str, first_row: int = 0, stop_row: int | None = None) -> None:
        """Drop the pages of the tensor's rows first_row..stop_row-1 (all by default) from this process: they
        stay in the page cache, and a later touch reads them again. Rounded out to whole pages: a
        neighbour's released page is read back if it is touched."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        rows = entry["shape"][0] if entry["shape"] else 1
        row_bytes = (end - begin) // max(rows, 1)
        stop_row = rows if stop_row is None else stop_row
        start = (self._data_start + begin + first_row * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._data_start + begin + stop_row * row_bytes
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def nbytes(self) -> int:
        return self.path.stat().st_size
