"""Which built-in model a board is told to run: fake readings for the three boards the configs ship for."""

import json
from dataclasses import replace

from llmqtt.modelchoice import Speed, recommend_model, speed_from_bench
from llmqtt.readings import SystemReadings

KiB, MiB = 1024, 2**20
PI5_FLAGS = frozenset({"fp", "asimd", "asimdhp", "asimddp"})


def pi5(ram_kib: int) -> SystemReadings:
    """A Raspberry Pi 5 on Raspberry Pi OS Lite 64-bit: 4 Cortex-A76 cores, no bf16, zram swap."""
    return SystemReadings(arch="aarch64", cpu_model="Cortex-A76", board_model="Raspberry Pi 5 Model B Rev 1.0",
                          cpu_flags=PI5_FLAGS, physical_cores=4, logical_cores=4, ram_total=ram_kib * KiB,
                          ram_available=int(ram_kib * 0.9) * KiB, swap_total=512 * MiB, swap_free=512 * MiB,
                          cgroup_version=2, memory_controller=True, cgroup_memory_max="max")


PI5_4GB = pi5(4_045_000)  # MemTotal of a 4 GB board
PI5_8GB = pi5(8_146_000)
# An Intel N100 mini PC with 16 GB: 4 cores, AVX2, no AVX512.
MINIPC = SystemReadings(arch="x86_64", cpu_model="Intel(R) N100", board_model="N100 mini PC",
                        cpu_flags=frozenset({"avx2", "fma", "avx_vnni"}), physical_cores=4, logical_cores=4,
                        ram_total=16_090_000 * KiB, ram_available=14_000_000 * KiB, swap_total=2 * 2**30,
                        swap_free=2 * 2**30, cgroup_version=2, memory_controller=True, cgroup_memory_max="max")


def test_pi5_4gb_runs_the_05b_because_the_15b_does_not_fit():
    choice = recommend_model(PI5_4GB, quantize="int8")
    assert choice.name == "demo"
    coder = next(o for o in choice.options if o.name == "coder-1.5b")
    assert not coder.ok and "over 60% of 3.9 GiB" in coder.why
    assert "coder-1.5b:" in choice.reason


def test_pi5_8gb_runs_the_15b_with_int8_but_not_in_float32():
    choice = recommend_model(PI5_8GB, quantize="int8")
    assert choice.name == "coder-1.5b"
    # what the smaller model buys, from the two architectures' sizes and the planner's estimates
    assert "demo if you need faster answers (3.7x less compute per message) or 1.4 GiB more memory" in choice.reason
    # float32 weights of the 1.5B alone are ~6 GiB: too much beside the OS and Home Assistant.
    assert recommend_model(PI5_8GB, quantize="none").name == "demo"


def test_x86_minipc_runs_the_15b_even_in_float32():
    choice = recommend_model(MINIPC, quantize="none")
    assert choice.name == "coder-1.5b" and choice.reason.startswith("this board: coder-1.5b fits")
    assert "speed not measured" in choice.reason


def test_auto_is_judged_as_the_scheme_the_board_would_load():
    """`quantize: auto` is int8 on x86 and int4 on a Pi 5 (dotprod): sized as such, not as float32."""
    x86 = recommend_model(MINIPC, quantize="auto")
    assert x86.name == "coder-1.5b" and "~2.8 GiB serving with int8" in x86.reason
    pi = recommend_model(PI5_8GB, quantize="auto")
    assert pi.name == "coder-1.5b" and "with int4" in pi.reason
    assert recommend_model(PI5_4GB, quantize="auto").name == "demo"


def test_two_cores_are_too_few_for_the_15b_whatever_the_memory():
    choice = recommend_model(replace(MINIPC, physical_cores=2, logical_cores=2), quantize="none")
    assert choice.name == "demo"
    assert "2 usable cores" in next(o.why for o in choice.options if o.name == "coder-1.5b")
    # a cgroup CPU quota counts the same as missing cores
    assert recommend_model(replace(MINIPC, cpu_quota_cores=2.0)).name == "demo"


def test_a_measured_slow_15b_is_ruled_out_and_a_fast_one_is_quoted():
    slow = {"coder-1.5b": Speed(sentiment_ms=1400, chat_tokens_per_s=4.0), "demo": Speed(400, 12.0)}
    choice = recommend_model(PI5_8GB, quantize="int8", measured=slow)
    assert choice.name == "demo" and "sentiment ~1400 ms" in choice.reason
    fast = recommend_model(MINIPC, measured={"coder-1.5b": Speed(600, 9.5), "demo": Speed(180, 17.0)})
    assert fast.reason.startswith("this board: coder-1.5b fits (~8.0 GiB serving, sentiment ~600 ms, chat ~9.5 "
                                  "tok/s measured); demo if you need faster answers (3.7x less compute per "
                                  "message; sentiment ~180 ms, chat ~17.0 tok/s measured)")


def test_a_cgroup_memory_limit_counts_like_small_ram():
    assert recommend_model(replace(MINIPC, cgroup_memory_max=4 * 2**30)).name == "demo"


def test_nothing_fits_still_names_the_smallest():
    tiny = pi5(1_000_000)
    choice = recommend_model(tiny)
    assert choice.name == "demo" and "smallest built-in model" in choice.reason


def test_speed_is_read_from_a_bench_result(repo_root):
    result = json.loads((repo_root / "docs" / "bench" / "result.json").read_text())
    name, speed = speed_from_bench(result)
    assert name == "demo" and speed.sentiment_ms > 0 and speed.chat_tokens_per_s > 0
    # a run's `default` variant counts for the scheme it loaded (float32+int8 on this x86 bench machine)
    quick = json.loads((repo_root / "docs" / "bench" / "quick" / "result.json").read_text())
    default = quick["variants"]["default"]
    assert speed_from_bench(quick, "int8") == ("demo", Speed(default["sentiment"]["classify_one"]["p50_ms"],
                                                             default["chat"]["decode_tokens_per_s"]))
    assert speed_from_bench(quick, "int4") is None  # not what that run measured
    assert speed_from_bench({"meta": {"model": "someone else's"}, "variants": {}}) is None
