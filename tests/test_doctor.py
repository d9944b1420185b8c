"""`llmqtt doctor`: the report, its problems, text and JSON output, exit status."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from llmqtt import doctor
from llmqtt.config import Config
from llmqtt.doctor import build_report, format_report
from llmqtt.planner import GiB, MiB

from test_modelfacts import write_model
from test_planner import board

KiB = 1024


def nowhere(_model_config) -> None:
    return None


def codes(report: dict) -> dict[str, str]:
    return {p["code"]: p["severity"] for p in report["problems"]}


def test_demo_not_fetched_reports_unknown_facts() -> None:
    report = build_report(Config(), readings=board(), locate=nowhere)
    assert report["model"] == {"name": "demo", "dir": None, "facts": None}
    assert report["plan"]["verdict"] == "unknown" and report["plan"]["threads"] == 3
    assert report["plan"]["dtype"] == "float32"
    assert codes(report) == {"model_not_fetched": "info", "no_swap": "warning"}
    assert not doctor.is_fatal(report)
    text = format_report(report)
    assert "facts          unknown" in text and "model_not_fetched" in text


def test_missing_model_without_auto_fetch_is_fatal(tmp_path: Path) -> None:
    config = Config.model_validate({"model": {"name": str(tmp_path / "nope"), "auto_fetch": False}})
    report = build_report(config, readings=board(), locate=nowhere)
    assert codes(report)["model_missing"] == "fatal" and doctor.is_fatal(report)


def test_small_pi_without_swap_or_memory_cgroup(tmp_path: Path) -> None:
    pi = board(memory_controller=False, cgroup_memory_max=None, temperature_c=83.0,
               temperature_sensor="cpu_thermal", throttled=0x50005)
    report = build_report(Config(), write_model(tmp_path / "m", tie=False), readings=pi)
    found = codes(report)
    assert found["no_swap"] == "warning" and found["no_memory_cgroup"] == "warning"
    assert found["hot"] == "warning" and found["under_voltage"] == "warning"
    assert report["plan"]["verdict"] == "ok"
    assert report["model"]["facts"]["num_hidden_layers"] == 2
    assert "cgroup_enable=memory" in format_report(report)


def test_refused_model_is_fatal_and_lists_suggestions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = write_model(tmp_path / "m", tie=False)
    container = board(arch="x86_64", ram_total=64 * GiB, ram_available=60 * GiB, cgroup_memory_max=300 * MiB,
                      cgroup_memory_current=10 * MiB)
    report = build_report(Config(), model, readings=container)
    assert report["plan"]["verdict"] == "refuse" and codes(report)["model_too_large"] == "fatal"
    text = format_report(report)
    assert "verdict        refuse" in text and "- raise the cgroup memory limit" in text

    monkeypatch.setattr(doctor, "read_system", lambda: container)
    assert doctor.main(Config(), as_json=False, model_dir=model) == 1
    assert "Problems" in capsys.readouterr().out


def test_json_output_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(doctor, "read_system", lambda: board(ram_total=8 * GiB, ram_available=7 * GiB,
                                                             swap_total=GiB, swap_free=GiB))
    assert doctor.main(Config(), as_json=True, model_dir=write_model(tmp_path / "m", tie=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["verdict"] == "ok" and data["problems"] == []
    assert data["plan"]["memory"]["steady"] == sum(data["plan"]["memory"][k] for k in
                                                   ("weights", "kv_cache", "activations", "runtime"))
    assert data["readings"]["native_bf16"] is False and "asimd" in data["readings"]["cpu_flags"]


def test_unreadable_model_dir_is_fatal(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    report = build_report(Config(), tmp_path, readings=board())
    assert codes(report)["model_unreadable"] == "fatal" and report["model"]["facts"] is None


def test_locator_errors_become_a_warning() -> None:
    def broken(_model_config):
        raise OSError("disk on fire")

    report = build_report(Config(), readings=board(), locate=broken)
    assert codes(report)["model_locate_failed"] == "warning" and "model_not_fetched" not in codes(report)


def test_lowered_limits_and_slow_dtype_are_reported(tmp_path: Path) -> None:
    config = Config.model_validate({"model": {"dtype": "bfloat16"}, "runtime": {"max_batch": 64}})
    tight = board(ram_total=2 * GiB, ram_available=int(1.2 * GiB), swap_total=GiB, swap_free=GiB)
    report = build_report(config, write_model(tmp_path / "m", tie=False), readings=tight)
    found = codes(report)
    assert found["dtype_slow"] == "warning"
    assert report["plan"]["verdict"] == "ok"
    assert found.get("limits_lowered") in (None, "info")


def test_live_machine_report_runs() -> None:
    report = build_report(Config(), readings=None, locate=nowhere)
    json.dumps(report)
    assert "Machine" in format_report(report)


def test_pi_readings_from_a_fake_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmqtt.readings import read_system
    from test_readings import PI5_CPUINFO, fake_psutil, meminfo, write as write_file

    write_file(tmp_path, "proc/cpuinfo", PI5_CPUINFO)
    write_file(tmp_path, "proc/meminfo", meminfo(2_000_000, 1_700_000))
    fake_psutil(monkeypatch, tmp_path, cores=(4, 4))
    pi = read_system(tmp_path, machine="aarch64")
    assert pi.ram_available == 1_700_000 * 1024
    report = build_report(Config(), write_model(tmp_path / "m", tie=False), readings=replace(pi, swap_total=0))
    assert report["readings"]["cpu_model"] == "Cortex-A76" and "no_swap" in codes(report)


def test_int8_with_bfloat16_is_fatal(tmp_path: Path) -> None:
    config = Config.model_validate({"model": {"dtype": "bfloat16", "quantize": "int8"}})
    report = build_report(config, write_model(tmp_path / "m", tie=False), readings=board(ram_available=7 * GiB))
    assert codes(report)["int8_needs_float32"] == "fatal" and doctor.is_fatal(report)


def test_doctor_recommends_a_model_and_reads_measured_speed(tmp_path: Path) -> None:
    from test_modelchoice import PI5_8GB

    config = Config.model_validate({"model": {"name": "coder-1.5b", "quantize": "int8"}})
    report = build_report(config, readings=PI5_8GB, locate=nowhere)
    assert report["recommendation"]["name"] == "coder-1.5b"
    assert "Recommended model\n  this board: coder-1.5b fits" in format_report(report)
    assert codes(report)["model_not_fetched"] == "info"  # a built-in name is fetched on first start
    bench = {"meta": {"model": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)"},
             "variants": {"int8": {"sentiment": {"classify_one": {"p50_ms": 2500.0}},
                                   "chat": {"decode_tokens_per_s": 3.0}}}}
    (tmp_path / "result.json").write_text(json.dumps(bench))
    measured = doctor.read_bench_speeds([tmp_path / "result.json"], "int8")
    slow = build_report(config, readings=PI5_8GB, locate=nowhere, measured=measured)
    assert slow["recommendation"]["name"] == "demo" and "sentiment ~2500 ms" in slow["recommendation"]["reason"]


@pytest.mark.parametrize("flags, tools, kernel", [
    ({"avx2", "fma"}, {"c++", "ninja"}, "llmqtt AVX2"),
    ({"avx2", "fma"}, {"c++"}, "fbgemm"),
    ({"sse4_2"}, {"c++", "ninja"}, "fbgemm"),
])
def test_doctor_names_the_int8_kernel_on_x86(flags, tools, kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.shutil, "which", lambda tool: f"/usr/bin/{tool}" if tool in tools else None)
    x86 = board(arch="x86_64", cpu_model="AMD EPYC", cpu_flags=frozenset(flags))
    report = build_report(Config(), readings=x86, locate=nowhere)
    assert report["plan"]["quantize"] == "int8" and report["plan"]["int8_kernel"] == kernel
    assert f"int8 product   {kernel}:" in format_report(report)
    pi = build_report(Config(), readings=board(), locate=nowhere)  # int4 on a Pi 5: no int8 line
    assert "int8_kernel" not in pi["plan"] and "int8 product" not in format_report(pi)
