"""Hand a thread's OpenMP threads back when it is done with torch, so the thread that serves runs at full speed.

torch's CPU ops (and inductor's compiled kernels) run their parallel loops on OpenMP. Each Python thread
that runs one gets its own team of worker threads, kept until that thread ends. GNU OpenMP (libgomp, what
torch's wheels ship) counts the threads of every team alive; once there are more than CPUs it stops
spinning between parallel loops (100 spins instead of 300,000) and puts its workers to sleep, and a decode
step is ~200 short parallel loops, each then waiting for a worker to wake up.

The daemon's main thread loads and warms the engine, then the service's worker serves: two teams of 2 on
2 cores. A chat through the worker decoded at 22-24 tok/s beside the main thread's idle team, and at
39-45 tok/s once the main thread had handed its team back (demo model, int8, compiled step, 64 tokens,
3 runs each, 2026-11-29). A Pi 5 (4 cores, 3 torch threads) has the same: 6 threads in two teams.

`omp_pause_resource_all` (OpenMP 5.0) frees the calling thread's team; its next parallel loop starts a new
one (~0.1 ms). Where no OpenMP runtime is loaded, or it lacks the call, nothing happens.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# GNU's (torch's Linux wheels), Intel's and LLVM's runtimes, as they appear among a process's mappings
RUNTIME_NAMES = re.compile(r"/lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")
OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what is cheap to keep


def release_threads() -> bool:
    """Free the calling thread's OpenMP team; True if a runtime did. Call it from the thread that is done."""
    pause = _pause_call()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0


@functools.cache
def _pause_call() -> Callable[[int], int] | None:
    path = loaded_runtime()
    if path is None:
        return None
    try:
        pause = ctypes.CDLL(path).omp_pause_resource_all  # the loaded library: dlopen returns its handle
    except (OSError, AttributeError) as exc:
        log.debug("OpenMP threads cannot be handed back (%s): %s", path, exc)
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


def loaded_runtime(maps: Path = Path("/proc/self/maps")) -> str | None:
    """The path of the OpenMP runtime this process has loaded (torch loads it), or None."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:  # not Linux
        return None
    for line in lines:
        fields = line.split(maxsplit=5)  # address, permissions, offset, device, inode[, path]
        if len(fields) == 6 and RUNTIME_NAMES.search(fields[5]):
            return fields[5]
    return None
