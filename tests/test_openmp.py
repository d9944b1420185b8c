"""engine/openmp.py: a thread done with torch frees its OpenMP team (see the module for why it matters)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from llmqtt.engine import openmp

MAPS = """\
7f0000000000-7f0000001000 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000002000-7f0000003000 r-xp 00000000 00:00 0
7f0000004000-7f0000005000 r-xp 00000000 08:01 456 {runtime}
"""


@pytest.mark.parametrize("runtime", ["/site-packages/torch/lib/libgomp.so.1", "/opt/lib/libgomp-a34b3233.so.1",
                                     "/opt/intel/lib/libiomp5.so", "/usr/lib/llvm-16/lib/libomp.so.5"])
def test_the_openmp_runtime_is_found_among_the_mappings(tmp_path, runtime):
    maps = tmp_path / "maps"
    maps.write_text(MAPS.format(runtime=runtime))
    assert openmp.loaded_runtime(maps) == runtime


def test_no_runtime_or_no_proc_means_none(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(MAPS.format(runtime="/usr/lib/libgompish-not.txt"))
    assert openmp.loaded_runtime(maps) is None
    assert openmp.loaded_runtime(tmp_path / "missing") is None


def test_torch_loads_a_runtime_this_module_finds():
    import torch  # noqa: F401 - loads the OpenMP runtime

    assert openmp.loaded_runtime() is not None


# In a fresh process: a thread that ran a parallel torch op has a team of OpenMP threads (one per torch
# thread but itself); release_threads in that thread ends them, and its next op starts them again.
TEAM = textwrap.dedent("""
    import os, threading, time, torch
    from llmqtt.engine import openmp
    torch.set_num_threads(2)
    def threads():
        return len(os.listdir("/proc/self/task"))
    def op():
        x = torch.ones(1_000_000)
        (x * 2).sum()  # large enough to run in parallel
    counts = []
    def run():
        counts.append(threads()); op(); counts.append(threads())
        counts.append(openmp.release_threads()); time.sleep(0.2); counts.append(threads())
        op(); counts.append(threads())
    t = threading.Thread(target=run); t.start(); t.join()
    print(counts)
""")


def test_a_thread_done_with_torch_frees_its_openmp_team_and_gets_one_again():
    done = subprocess.run([sys.executable, "-c", TEAM], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, with_team, released, after_release, again = eval(done.stdout.strip().splitlines()[-1])
    assert released is True
    assert with_team == before + 1 and after_release == before and again == before + 1
