"""Readers against fake /proc and /sys trees: psutil with `PROCFS_PATH` pointed at the fake /proc (and its
/sys-based counts replaced), our own readers with `root` pointed at the tree."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from llmqtt import readings
from llmqtt.readings import (SystemReadings, decode_throttled, live_available_bytes, read_cgroup,
                             read_core_counts, read_system, read_temperature, read_throttled)

GiB = 2**30

PI5_CPUINFO = "".join(
    f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp"
    f" asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\n"
    for n in range(4)) + "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"

X86_CPUINFO = "".join(
    f"processor\t: {n}\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nphysical id\t: 0\ncore id\t\t: {n // 2}\n"
    f"flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n" for n in range(8))


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def meminfo(total_kb: int, available_kb: int, swap_kb: int = 0, swap_free_kb: int = 0) -> str:
    return (f"MemTotal:       {total_kb} kB\nMemFree:         1000 kB\nMemAvailable:   {available_kb} kB\n"
            "Buffers:          2000 kB\nCached:          30000 kB\nShmem:            100 kB\n"
            "Active:          40000 kB\nInactive:        20000 kB\nSReclaimable:     500 kB\n"
            f"SwapTotal:      {swap_kb} kB\nSwapFree:       {swap_free_kb} kB\n")


Temperature = namedtuple("Temperature", "label current high critical")  # psutil's shwtemp


def fake_psutil(monkeypatch: pytest.MonkeyPatch, root: Path, cores: tuple[int | None, int] = (1, 1),
                temperatures: dict | None = None, affinity: int | None = None) -> None:
    """psutil answering for the board in `root`: /proc (meminfo, vmstat) through its PROCFS_PATH; the core
    counts, sensors and affinity it reads from /sys or syscalls, which have no such switch, replaced."""
    write(root, "proc/vmstat", "pswpin 0\npswpout 0\n")
    if not (root / "proc/meminfo").exists():
        write(root, "proc/meminfo", "")
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(root / "proc"))
    physical, logical = cores
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: cores[1] if logical else physical)
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: temperatures or {}, raising=False)

    class Process:
        def cpu_affinity(self) -> list[int]:
            return list(range(affinity if affinity is not None else logical))

    monkeypatch.setattr(psutil, "Process", Process)


@pytest.fixture
def pi5(tmp_path: Path) -> Path:
    """A Raspberry Pi 5 (4 GB) with Raspberry Pi OS: cgroup v2 without the memory controller, no swap."""
    write(tmp_path, "proc/cpuinfo", PI5_CPUINFO)
    write(tmp_path, "proc/meminfo", meminfo(4_045_000, 3_600_000))
    write(tmp_path, "proc/device-tree/model", "Raspberry Pi 5 Model B Rev 1.0\x00")
    write(tmp_path, "proc/self/cgroup", "0::/system.slice/llmqtt.service\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io pids\n")
    write(tmp_path, "sys/devices/platform/soc@107c000000/soc@107c000000:firmware/get_throttled", "50005\n")
    return tmp_path


def test_pi5_tree(pi5: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_psutil(monkeypatch, pi5, cores=(4, 4), temperatures={"cpu_thermal": [Temperature("", 61.25, None, None)]})
    r = read_system(pi5, machine="aarch64")
    assert (r.physical_cores, r.logical_cores) == (4, 4)
    assert r.cpu_model == "Cortex-A76" and r.board_model == "Raspberry Pi 5 Model B Rev 1.0"
    assert "asimdhp" in r.cpu_flags and not r.native_bf16
    assert (r.ram_total, r.ram_available, r.swap_total) == (4_045_000 * 1024, 3_600_000 * 1024, 0)
    assert (r.cgroup_version, r.memory_controller, r.cgroup_memory_max) == (2, False, None)
    assert (r.temperature_c, r.temperature_sensor) == (61.25, "cpu_thermal")
    assert r.throttled == 0x50005
    assert r.throttled_flags == ["under-voltage now", "throttled now", "under-voltage has occurred since boot",
                                 "throttling has occurred since boot"]
    assert r.affinity_cores == 4


def test_missing_files_give_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_psutil(monkeypatch, tmp_path, cores=(None, 1))
    (tmp_path / "proc/meminfo").unlink()  # psutil raises for a missing /proc/meminfo
    r = read_system(tmp_path, machine="riscv64")
    assert (r.physical_cores, r.logical_cores) == (1, 1)  # psutil's None for physical: no SMT assumed
    assert r.cpu_model is None and r.cpu_flags == frozenset()
    assert r.ram_total is None and r.memory_available is None
    assert (r.cgroup_version, r.memory_controller, r.temperature_c, r.throttled) == (None, None, None, None)


def test_aarch64_bf16_flag(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU part\t: 0xd40\n")
    r = read_system(tmp_path, machine="aarch64")
    assert r.native_bf16 and r.cpu_model == "Neoverse-V1"


def test_x86_model_and_flags(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", X86_CPUINFO)
    r = read_system(tmp_path, machine="x86_64")
    assert r.native_bf16 and r.cpu_model == "Intel(R) Xeon(R) Platinum 8480+"


def test_psutil_without_physical_count_means_no_smt(monkeypatch: pytest.MonkeyPatch) -> None:
    real = psutil.cpu_count
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None if not logical else real())
    physical, logical = read_core_counts()
    assert physical == logical >= 1


def test_core_counts_on_this_machine_are_psutils() -> None:
    assert read_core_counts() == (psutil.cpu_count(logical=False) or psutil.cpu_count(), psutil.cpu_count())


def test_cgroup_v2_container_limit(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "0::/\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    write(tmp_path, "sys/fs/cgroup/memory.max", f"{GiB}\n")
    write(tmp_path, "sys/fs/cgroup/memory.current", f"{100 * 2**20}\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "150000 100000\n")
    c = read_cgroup(tmp_path)
    assert (c.version, c.memory_controller, c.memory_max, c.memory_current) == (2, True, GiB, 100 * 2**20)
    assert c.cpu_quota_cores == 1.5


def test_cgroup_v2_service_takes_tightest_ancestor(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "0::/system.slice/llmqtt.service\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    write(tmp_path, "sys/fs/cgroup/system.slice/memory.max", f"{2 * GiB}\n")
    write(tmp_path, "sys/fs/cgroup/system.slice/memory.current", f"{int(1.5 * GiB)}\n")
    write(tmp_path, "sys/fs/cgroup/system.slice/llmqtt.service/memory.max", f"{3 * GiB}\n")
    write(tmp_path, "sys/fs/cgroup/system.slice/llmqtt.service/memory.current", f"{GiB // 10}\n")
    write(tmp_path, "sys/fs/cgroup/system.slice/llmqtt.service/cpu.max", "max 100000\n")
    c = read_cgroup(tmp_path)
    assert (c.memory_max, c.memory_current) == (2 * GiB, int(1.5 * GiB))  # the slice leaves less room
    assert c.cpu_quota_cores is None


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "0::/user.slice\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "memory\n")
    write(tmp_path, "sys/fs/cgroup/user.slice/memory.max", "max\n")
    write(tmp_path, "sys/fs/cgroup/user.slice/memory.current", "12345\n")
    c = read_cgroup(tmp_path)
    assert (c.memory_max, c.memory_current) == ("max", 12345)


def test_cgroup_v1(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path, "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", f"{512 * 2**20}\n")
    write(tmp_path, "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes", f"{12 * 2**20}\n")
    write(tmp_path, "sys/fs/cgroup/cpu/docker/abc/cpu.cfs_quota_us", "200000\n")
    write(tmp_path, "sys/fs/cgroup/cpu/docker/abc/cpu.cfs_period_us", "100000\n")
    c = read_cgroup(tmp_path)
    assert (c.version, c.memory_controller, c.memory_max, c.memory_current) == (1, True, 512 * 2**20, 12 * 2**20)
    assert c.cpu_quota_cores == 2.0


def test_cgroup_v1_unlimited_is_max(tmp_path: Path) -> None:
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", "4096\n")
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    c = read_cgroup(tmp_path)
    assert (c.memory_max, c.memory_current, c.cpu_quota_cores) == ("max", 4096, None)


def test_memory_available_is_capped_by_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "proc/meminfo", meminfo(64 * 2**20, 60 * 2**20))
    fake_psutil(monkeypatch, tmp_path)
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "memory\n")
    write(tmp_path, "sys/fs/cgroup/memory.max", f"{GiB}\n")
    write(tmp_path, "sys/fs/cgroup/memory.current", f"{GiB // 4}\n")
    assert read_system(tmp_path, machine="x86_64").memory_available == GiB * 3 // 4
    assert live_available_bytes(tmp_path) == GiB * 3 // 4


def test_the_cpu_sensor_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_psutil(monkeypatch, tmp_path, temperatures={"acpitz": [Temperature("", 40.0, None, None)],
                                                      "x86_pkg_temp": [Temperature("", 72.5, None, None)]})
    assert read_temperature() == (72.5, "x86_pkg_temp")


def test_an_unknown_sensor_beats_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_psutil(monkeypatch, tmp_path, temperatures={"rockchip_soc": [Temperature("", 48.0, None, None)]})
    assert read_temperature() == (48.0, "rockchip_soc")
    fake_psutil(monkeypatch, tmp_path, temperatures={})
    assert read_temperature() == (None, None)


def test_memory_from_a_fake_proc_through_psutil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "proc/meminfo", meminfo(4_045_000, 3_600_000, swap_kb=1_000_000, swap_free_kb=900_000))
    fake_psutil(monkeypatch, tmp_path)
    assert readings.read_memory() == {"ram_total": 4_045_000 * 1024, "ram_available": 3_600_000 * 1024,
                                      "swap_total": 1_000_000 * 1024, "swap_free": 900_000 * 1024}


def test_the_package_label_is_preferred(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {
        "nvme": [Temperature("Composite", 35.0, None, None)],
        "k10temp": [Temperature("Tccd1", 60.0, None, None), Temperature("Tctl", 55.5, None, None)]}, raising=False)
    assert read_temperature() == (55.5, "k10temp")


def test_throttled_pi4_path_and_garbage(tmp_path: Path) -> None:
    write(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "0\n")
    assert read_throttled(tmp_path) == 0
    write(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "zz\n")
    assert read_throttled(tmp_path) is None
    assert decode_throttled(0x80008) == ["soft temperature limit active now",
                                         "soft temperature limit has occurred since boot"]


def test_live_machine_reads_without_error() -> None:
    r = read_system()
    assert isinstance(r, SystemReadings) and r.physical_cores >= 1 and r.ram_total and r.ram_total > 0


def test_env_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert readings.read_env_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert readings.read_env_threads() is None
