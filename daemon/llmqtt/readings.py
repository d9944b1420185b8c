"""Read the machine: cores, memory, cgroup limits, temperature, CPU features. (A model directory's numbers:
modelfacts.py.)

Everything here only reads: the results are frozen values that `planner.py` turns into decisions.

One source per reading. psutil answers what it knows: core counts, memory and swap, temperatures and the
CPU affinity (tests point `psutil.PROCFS_PATH` at a fake /proc, or replace a psutil function). What psutil
does not read (the CPU model and flags from /proc/cpuinfo, cgroup limits, the board model, the Pi's
throttling bits) is read from files under `root` (default `/`; tests pass a fake tree). A file that is
missing or unreadable never raises: the field it feeds becomes None.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

LIVE_ROOT = Path("/")

# cgroup v1 reports "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX * page size), not "max".
_V1_UNLIMITED = 1 << 60

# Known temperature sensors, most relevant first: the SoC on a Pi, the CPU package on x86.
_PREFERRED_SENSORS = ("cpu_thermal", "k10temp", "coretemp", "zenpower", "soc_thermal", "cpu-thermal",
                      "x86_pkg_temp", "acpitz")
_PREFERRED_LABELS = ("Tdie", "Tctl", "Package id 0")

# Raspberry Pi firmware `get_throttled` bits (same as `vcgencmd get_throttled`). The low bits describe
# now, the high bits are sticky since boot. Anything set means the CPU ran (or runs) slower than it can.
THROTTLED_BITS: dict[int, str] = {
    0: "under-voltage now",
    1: "ARM frequency capped now",
    2: "throttled now",
    3: "soft temperature limit active now",
    16: "under-voltage has occurred since boot",
    17: "ARM frequency capping has occurred since boot",
    18: "throttling has occurred since boot",
    19: "soft temperature limit has occurred since boot",
}
THROTTLED_NOW_MASK = 0xF

# aarch64 /proc/cpuinfo has no model name, only an ARM part number; these are the boards we expect.
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76",
              "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd4f": "Neoverse-V2"}


@dataclass(frozen=True)
class SystemReadings:
    """One snapshot of the machine. Bytes are bytes; None means "could not be read"."""

    arch: str  # platform.machine(): "aarch64", "x86_64", ...
    cpu_model: str | None
    board_model: str | None  # device-tree model on a Pi ("Raspberry Pi 5 Model B Rev 1.0"), DMI product on x86
    cpu_flags: frozenset[str]  # x86 `flags` / aarch64 `Features` from /proc/cpuinfo
    physical_cores: int
    logical_cores: int
    affinity_cores: int | None = None  # CPUs this process may run on (taskset / cpuset)
    cpu_quota_cores: float | None = None  # cgroup CPU quota as cores (cpu.max 200000 100000 -> 2.0)
    env_threads: int | None = None  # OMP_NUM_THREADS set by the operator
    ram_total: int | None = None
    ram_available: int | None = None
    swap_total: int | None = None
    swap_free: int | None = None
    cgroup_version: Literal[1, 2] | None = None
    # Whether the kernel's memory controller is on; without it a unit's MemoryMax= does nothing.
    memory_controller: bool | None = None
    cgroup_memory_max: int | Literal["max"] | None = None  # the tightest limit on our cgroup path
    cgroup_memory_current: int | None = None  # usage of the cgroup that limit belongs to
    temperature_c: float | None = None
    temperature_sensor: str | None = None
    throttled: int | None = None  # raw Raspberry Pi get_throttled bits, see THROTTLED_BITS

    @property
    def native_bf16(self) -> bool:
        """True where matrix math in bfloat16 runs in hardware, so bf16 is faster than fp32, not slower."""
        if self.arch in ("aarch64", "arm64"):
            return "bf16" in self.cpu_flags
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)

    @property
    def cgroup_memory_headroom(self) -> int | None:
        """Bytes left under the cgroup memory limit, or None when there is no limit (or it is unknown)."""
        if not isinstance(self.cgroup_memory_max, int):
            return None
        return max(0, self.cgroup_memory_max - (self.cgroup_memory_current or 0))

    @property
    def memory_available(self) -> int | None:
        """What a new allocation can get without swapping: RAM available, capped by the cgroup headroom."""
        known = [v for v in (self.ram_available, self.cgroup_memory_headroom) if v is not None]
        return min(known) if known else None

    @property
    def throttled_flags(self) -> list[str]:
        return decode_throttled(self.throttled) if self.throttled is not None else []


def decode_throttled(bits: int) -> list[str]:
    return [text for bit, text in THROTTLED_BITS.items() if bits & (1 << bit)]


def read_system(root: Path = LIVE_ROOT, machine: str | None = None) -> SystemReadings:
    """Read everything; `machine` overrides platform.machine() (a fake tree has no uname)."""
    root = Path(root)
    cpuinfo = read_cpuinfo(root)
    physical, logical = read_core_counts()
    memory = read_memory()
    cgroup = read_cgroup(root)
    temperature, sensor = read_temperature()
    return SystemReadings(
        arch=machine or platform.machine(),
        cpu_model=cpuinfo.model,
        board_model=read_board_model(root),
        cpu_flags=cpuinfo.flags,
        physical_cores=physical,
        logical_cores=logical,
        affinity_cores=read_affinity(),
        cpu_quota_cores=cgroup.cpu_quota_cores,
        env_threads=read_env_threads(),
        ram_total=memory.get("ram_total"),
        ram_available=memory.get("ram_available"),
        swap_total=memory.get("swap_total"),
        swap_free=memory.get("swap_free"),
        cgroup_version=cgroup.version,
        memory_controller=cgroup.memory_controller,
        cgroup_memory_max=cgroup.memory_max,
        cgroup_memory_current=cgroup.memory_current,
        temperature_c=temperature,
        temperature_sensor=sensor,
        throttled=read_throttled(root),
    )


def live_available_bytes(root: Path = LIVE_ROOT) -> int | None:
    """The cheap part of read_system for a runtime memory guard: RAM available capped by cgroup headroom."""
    memory = read_memory()
    cgroup = read_cgroup(root)
    known = [memory.get("ram_available")]
    if isinstance(cgroup.memory_max, int):
        known.append(max(0, cgroup.memory_max - (cgroup.memory_current or 0)))
    values = [v for v in known if v is not None]
    return min(values) if values else None


# --------------------------------------------------------------------------- files


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- CPU


@dataclass(frozen=True)
class CpuInfo:
    model: str | None
    flags: frozenset[str]


def read_cpuinfo(root: Path = LIVE_ROOT) -> CpuInfo:
    """The CPU model and feature flags (psutil reads neither). The first CPU's entry: big.LITTLE boards
    differ per core in model, not in flags."""
    fields: dict[str, str] = {}
    for line in (_read_text(Path(root) / "proc/cpuinfo") or "").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        fields.setdefault(key, value)
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    return CpuInfo(_cpu_model(fields), flags)


def _cpu_model(fields: dict[str, str]) -> str | None:
    if fields.get("model name"):
        return fields["model name"]
    part = fields.get("CPU part", "").lower()
    if part:
        return _ARM_PARTS.get(part, f"ARM part {part}")
    return fields.get("Hardware") or None


def read_core_counts() -> tuple[int, int]:
    """(physical, logical) cores. psutil counts physical cores from the sysfs topology, else /proc/cpuinfo;
    where the kernel exposes neither (some ARM boards) it says None, and those boards have no SMT."""
    logical = psutil.cpu_count(logical=True) or 1
    return psutil.cpu_count(logical=False) or logical, logical


def read_affinity() -> int | None:
    """CPUs this process may run on (taskset, a cpuset); None where the OS has no affinity masks."""
    try:
        return len(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error, OSError):  # AttributeError: not offered on this OS
        return None


def read_env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def read_board_model(root: Path = LIVE_ROOT) -> str | None:
    for relative in ("proc/device-tree/model", "sys/firmware/devicetree/base/model",
                     "sys/class/dmi/id/product_name"):
        text = _read_text(Path(root) / relative)
        if text and text.strip("\x00\n "):
            return text.strip("\x00\n ")
    return None


# --------------------------------------------------------------------------- memory


def read_memory() -> dict[str, int]:
    """ram_total / ram_available / swap_total / swap_free in bytes (psutil); empty when unreadable."""
    try:
        ram, swap = psutil.virtual_memory(), psutil.swap_memory()
    except (OSError, RuntimeError):
        return {}
    return {"ram_total": ram.total, "ram_available": ram.available, "swap_total": swap.total, "swap_free": swap.free}


# --------------------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class CgroupReadings:
    version: Literal[1, 2] | None
    memory_controller: bool | None
    memory_max: int | Literal["max"] | None
    memory_current: int | None
    cpu_quota_cores: float | None


def read_cgroup(root: Path = LIVE_ROOT) -> CgroupReadings:
    base = Path(root) / "sys/fs/cgroup"
    if (base / "cgroup.controllers").is_file():
        return _read_cgroup_v2(root, base)
    if (base / "memory").is_dir() or (base / "cpu").is_dir():
        return _read_cgroup_v1(root, base)
    return CgroupReadings(None, None, None, None, None)


def _own_cgroup_paths(root: Path) -> dict[str, str]:
    """Controller name ("" for v2) -> this process's path inside that hierarchy, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in (_read_text(Path(root) / "proc/self/cgroup") or "").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _chain(base: Path, relative: str) -> list[Path]:
    """Our cgroup directory and its ancestors up to `base`, deepest first; only those that exist.

    Limits are inherited: a service under system.slice is bound by its own MemoryMax= and by the slice's.
    Inside a container with a cgroup namespace our path is "/" and the chain is just `base`.
    """
    parts = [p for p in relative.strip().split("/") if p and p != ".."]
    dirs = [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _read_cgroup_v2(root: Path, base: Path) -> CgroupReadings:
    controllers = (_read_text(base / "cgroup.controllers") or "").split()
    chain = _chain(base, _own_cgroup_paths(root).get("", "/"))
    memory_max, memory_current = _tightest_memory_limit(chain, "memory.max", "memory.current")
    return CgroupReadings(2, "memory" in controllers, memory_max, memory_current,
                          _tightest_cpu_quota_v2(chain))


def _read_cgroup_v1(root: Path, base: Path) -> CgroupReadings:
    own = _own_cgroup_paths(root)
    memory_base = base / "memory"
    memory_max: int | Literal["max"] | None = None
    memory_current = None
    if memory_base.is_dir():
        chain = _chain(memory_base, own.get("memory", "/"))
        memory_max, memory_current = _tightest_memory_limit(chain, "memory.limit_in_bytes",
                                                            "memory.usage_in_bytes")
    cpu_base = base / "cpu" if (base / "cpu").is_dir() else base / "cpu,cpuacct"
    quota = _tightest_cpu_quota_v1(_chain(cpu_base, own.get("cpu", "/")))
    return CgroupReadings(1, memory_base.is_dir(), memory_max, memory_current, quota)


def _tightest_memory_limit(chain: list[Path], max_name: str,
                           current_name: str) -> tuple[int | Literal["max"] | None, int | None]:
    """The limit with the least headroom along the chain (and that cgroup's usage); "max" if none limits."""
    best: tuple[int, int | None] | None = None
    seen_unlimited = False
    for directory in chain:
        text = _read_text(directory / max_name)
        if text is None:
            continue
        current = _read_int(directory / current_name)
        limit = None if text.strip() == "max" else _parse_limit(text)
        if limit is None or limit >= _V1_UNLIMITED:
            seen_unlimited = True
            continue
        if best is None or limit - (current or 0) < best[0] - (best[1] or 0):
            best = (limit, current)
    if best is not None:
        return best
    if seen_unlimited:
        return "max", next((c for d in chain if (c := _read_int(d / current_name)) is not None), None)
    return None, None


def _parse_limit(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _tightest_cpu_quota_v2(chain: list[Path]) -> float | None:
    quotas = []
    for directory in chain:
        fields = (_read_text(directory / "cpu.max") or "").split()
        if len(fields) == 2 and fields[0] != "max" and fields[0].isdigit() and fields[1].isdigit():
            quotas.append(int(fields[0]) / max(1, int(fields[1])))
    return min(quotas) if quotas else None


def _tightest_cpu_quota_v1(chain: list[Path]) -> float | None:
    quotas = []
    for directory in chain:
        quota, period = _read_int(directory / "cpu.cfs_quota_us"), _read_int(directory / "cpu.cfs_period_us")
        if quota is not None and quota > 0 and period:
            quotas.append(quota / period)
    return min(quotas) if quotas else None


# --------------------------------------------------------------------------- temperature


def read_temperature() -> tuple[float | None, str | None]:
    """(°C, sensor name) of the SoC / CPU package, or (None, None) where no sensor is readable. psutil reads
    the hwmon sensors and the thermal zones."""
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError, RuntimeError):  # AttributeError: not offered on this OS
        return None, None
    for name in _PREFERRED_SENSORS:
        entries = sensors.get(name) or []
        preferred = [e for e in entries if e.label in _PREFERRED_LABELS] or entries
        if preferred:
            return float(preferred[0].current), name
    for name, entries in sorted(sensors.items()):  # an unknown board: its first sensor beats none
        if entries:
            return float(entries[0].current), name
    return None, None


def read_throttled(root: Path = LIVE_ROOT) -> int | None:
    # The device path differs between boards (Pi 4: soc/soc:firmware, Pi 5: soc@107c000000/...:firmware).
    for path in sorted(Path(root).glob("sys/devices/platform/soc*/soc*:firmware/get_throttled")):
        text = _read_text(path)
        try:
            return int(text.strip(), 16) if text else None  # the kernel prints "%x"
        except ValueError:
            return None
    return None
