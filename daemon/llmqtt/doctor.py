"""`llmqtt doctor`: what this machine is, what the planner would do with the configured model, and what
is wrong with the setup (no swap on a small board, a memory cgroup that is switched off, throttling...).

Reads only: no torch import, no downloads. Exit status 1 when a problem is fatal (the model would be
refused, or cannot be found with fetching turned off), else 0.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from .config import INT8_KERNEL_TOOLS, Config, ModelConfig, choose_int8_kernel, choose_quantize
from .engine.modelstore import BUILTIN_MODELS, locate_model, looks_like_hub_id
from .explain import explain, fmt_bytes, suggest
from .modelchoice import Speed, recommend_model, speed_from_bench
from .modelfacts import ModelFacts, ModelFactsError, read_model_facts
from .planner import choose_dtype, dtype_notes, low_memory_threshold, plan, plan_threads
from .readings import SystemReadings, read_system

GiB = 2**30
SMALL_RAM = 4 * GiB + GiB // 2  # "4 GB" boards report a little under 4 GiB; 8 GB boards are well above
HOT_C = 80.0  # the Pi 5 firmware starts throttling at 80 °C and throttles hard at 85 °C
SUPPORTED_ARCHES = ("aarch64", "arm64", "x86_64", "AMD64")

Severity = Literal["fatal", "warning", "info"]
Locator = Callable[[ModelConfig], "Path | None"]


@dataclass(frozen=True)
class Problem:
    code: str  # stable, for scripts: `no_swap`, `model_too_large`, ...
    severity: Severity
    message: str


# --------------------------------------------------------------------------- the report


def build_report(config: Config, model_dir: Path | None = None, *, readings: SystemReadings | None = None,
                 locate: Locator | None = None, measured: dict[str, Speed] | None = None) -> dict[str, Any]:
    """Readings, model facts, plan, the recommended built-in model and problems as plain JSON-ready data.

    `model_dir` None: look the model up without downloading (modelstore.locate_model). `measured`: speeds
    of built-in models on this board, from `llmqtt bench` results (modelchoice.speed_from_bench).
    """
    readings = readings or read_system()
    problems: list[Problem] = []
    if model_dir is None:
        model_dir = _locate(config.model, locate or locate_model, problems)
    facts = _facts(model_dir, problems)
    if model_dir is None and not any(p.code.startswith("model_") for p in problems):
        problems.append(_model_missing(config.model))
    plan_data = _plan_data(readings, facts, config)
    problems += machine_problems(readings) + plan_problems(plan_data)
    return {
        "readings": _jsonable(asdict(readings)) | {"throttled_flags": readings.throttled_flags,
                                                   "native_bf16": readings.native_bf16},
        "model": {"name": config.model.name, "dir": str(model_dir) if model_dir else None,
                  "facts": _jsonable(asdict(facts)) if facts else None},
        "plan": plan_data,
        "recommendation": asdict(recommend_model(readings, plan_data["quantize"], measured)),
        "problems": [asdict(p) for p in problems],
    }


def _locate(model_config: ModelConfig, locate: Locator, problems: list[Problem]) -> Path | None:
    try:
        return locate(model_config)
    except Exception as exc:  # noqa: BLE001 - a diagnostic tool reports, it does not crash
        problems.append(Problem("model_locate_failed", "warning",
                                f"could not look up model {model_config.name!r}: {type(exc).__name__}: {exc}"))
        return None


def _facts(model_dir: Path | None, problems: list[Problem]) -> ModelFacts | None:
    if model_dir is None:
        return None
    try:
        return read_model_facts(model_dir)
    except ModelFactsError as exc:
        problems.append(Problem("model_unreadable", "fatal", str(exc)))
        return None


def _model_missing(model_config: ModelConfig) -> Problem:
    name = model_config.name
    if model_config.auto_fetch and (name in BUILTIN_MODELS or looks_like_hub_id(name)):
        return Problem("model_not_fetched", "info",
                       f"model {name!r} is not on disk yet: it is fetched on first start, so its size is"
                       " unknown and the memory fit is not checked; run doctor again after the first start")
    if name.endswith(".gguf") and Path(name).is_file():
        return Problem("model_not_converted", "info",
                       f"{name} is converted to safetensors on first start; its size is checked after that")
    return Problem("model_missing", "fatal",
                   f"model {name!r} is not on disk" + ("" if model_config.auto_fetch else
                                                       " and model.auto_fetch is off"))


def _plan_data(readings: SystemReadings, facts: ModelFacts | None, config: Config) -> dict[str, Any]:
    data = _plan_numbers(readings, facts, config)
    if data["quantize"] == "int8":
        found = {tool for tool in INT8_KERNEL_TOOLS if shutil.which(tool)}
        data["int8_kernel"], data["int8_kernel_why"] = choose_int8_kernel(readings.arch, readings.cpu_flags, found)
    return data


def _plan_numbers(readings: SystemReadings, facts: ModelFacts | None, config: Config) -> dict[str, Any]:
    if facts is not None:
        p = plan(readings, facts, config.model, config.runtime)
        data = _jsonable(asdict(p)) | {"explanation": explain(p, facts), "suggestions": suggest(p, facts)}
        data["memory"] |= {"resident": p.memory.resident, "steady": p.memory.steady, "peak": p.memory.peak}
        return data
    # Without the model's numbers only the machine-side half of the plan is known.
    threads, interop = plan_threads(readings, config.runtime.threads, config.runtime.interop_threads)
    dtype = choose_dtype(config.model.dtype)
    quantize, why = choose_quantize(config.model.quantize, readings.arch, readings.cpu_flags, dtype)
    return {"threads": threads, "interop_threads": interop, "dtype": dtype, "quantize": quantize, "quantize_why": why,
            "memory": None, "budget": None, "max_batch": config.runtime.max_batch,
            "max_context": config.model.max_context, "requested_max_batch": config.runtime.max_batch,
            "requested_max_context": config.model.max_context,
            "max_generations": config.runtime.max_generations,
            "requested_max_generations": config.runtime.max_generations,
            "low_memory_bytes": low_memory_threshold(readings, config.runtime), "verdict": "unknown",
            "explanation": "The model's size is unknown, so the memory fit is not checked.",
            "suggestions": [], "notes": dtype_notes(readings, dtype, quantize)}


# --------------------------------------------------------------------------- problems


def machine_problems(r: SystemReadings) -> list[Problem]:
    found = []
    if r.arch not in SUPPORTED_ARCHES:
        found.append(Problem("unsupported_arch", "warning",
                             f"{r.arch}: torch has no wheels for it; use a 64-bit OS (aarch64 on a Pi)"))
    if r.swap_total == 0 and r.ram_total is not None and r.ram_total < SMALL_RAM:
        found.append(Problem("no_swap", "warning",
                             f"no swap with {fmt_bytes(r.ram_total)} RAM: a memory spike is an OOM kill instead of a"
                             " slowdown; enable zram (zram-tools, or rpi-swap on Raspberry Pi OS)"))
    if r.memory_controller is False:
        found.append(Problem("no_memory_cgroup", "warning",
                             "the kernel's memory cgroup controller is off, so MemoryMax= in the systemd unit and"
                             " container memory limits have no effect; on Raspberry Pi OS add"
                             " `cgroup_enable=memory` to /boot/firmware/cmdline.txt and reboot"))
    found += _thermal_problems(r)
    return found


def _thermal_problems(r: SystemReadings) -> list[Problem]:
    found = []
    if r.temperature_c is not None and r.temperature_c >= HOT_C:
        found.append(Problem("hot", "warning",
                             f"{r.temperature_sensor} at {r.temperature_c:.0f} °C: the CPU throttles; add a heatsink/fan"))
    if r.throttled is None or r.throttled == 0:
        return found
    flags = ", ".join(r.throttled_flags)
    if r.throttled & 0x1 or r.throttled & 0x10000:
        found.append(Problem("under_voltage", "warning",
                             f"{flags} (get_throttled=0x{r.throttled:x}): use the official power supply (5 V 5 A for a Pi 5)"))
    else:
        found.append(Problem("throttled", "warning" if r.throttled & 0xF else "info",
                             f"{flags} (get_throttled=0x{r.throttled:x}): inference runs slower while throttled"))
    return found


def plan_problems(plan_data: dict[str, Any]) -> list[Problem]:
    found = [Problem("int8_needs_float32", "fatal", n) if "computes in float32" in n else
             Problem("dtype_slow", "warning", n) for n in plan_data["notes"]]
    verdict = plan_data["verdict"]
    if verdict == "refuse":
        found.append(Problem("model_too_large", "fatal", plan_data["explanation"]))
    elif verdict == "swap":
        found.append(Problem("needs_swap", "warning", plan_data["explanation"]))
    lowered = [f"{field} from {plan_data['requested_' + key]} to {plan_data[key]}"
               for field, key in (("runtime.max_batch", "max_batch"), ("model.max_context", "max_context"),
                                  ("runtime.max_generations", "max_generations"))
               if plan_data[key] != plan_data["requested_" + key]]
    if verdict in ("ok", "swap") and lowered:
        found.append(Problem("limits_lowered", "info",
                             f"to fit, the daemon lowers {' and '.join(lowered)}; set them in the config to"
                             " silence this"))
    return found


def is_fatal(report: dict[str, Any]) -> bool:
    return any(p["severity"] == "fatal" for p in report["problems"])


# --------------------------------------------------------------------------- output


def format_report(report: dict[str, Any]) -> str:
    r, m, p = report["readings"], report["model"], report["plan"]
    lines = ["Machine"]
    lines += _machine_lines(r)
    lines += ["", "Model", f"  name           {m['name']}", f"  directory      {m['dir'] or 'not on disk'}"]
    lines += _facts_lines(m["facts"])
    lines += ["", "Plan"] + _plan_lines(p)
    lines += ["", "Recommended model", _wrap(report["recommendation"]["reason"], "  ")]
    lines += ["", "Problems"] + (
        [f"  [{x['severity']}] {x['code']}: {x['message']}" for x in report["problems"]] or ["  none"])
    return "\n".join(lines)


def _machine_lines(r: dict[str, Any]) -> list[str]:
    quota = f", cgroup quota {r['cpu_quota_cores']:g} cores" if r["cpu_quota_cores"] is not None else ""
    limit = r["cgroup_memory_max"]
    if r["cgroup_version"] is None:
        cgroup = "no cgroup filesystem"
    elif not r["memory_controller"]:
        cgroup = f"v{r['cgroup_version']}, memory controller OFF (memory limits cannot apply)"
    else:
        cgroup = (f"v{r['cgroup_version']}, memory limit "
                  + (fmt_bytes(limit) if isinstance(limit, int) else "none" if limit == "max" else "not found")
                  + (f", using {fmt_bytes(r['cgroup_memory_current'])}" if r["cgroup_memory_current"] is not None else ""))
    temperature = (f"{r['temperature_c']:.1f} °C ({r['temperature_sensor']})" if r["temperature_c"] is not None
                   else "not readable")
    throttled = ("not a Raspberry Pi (no get_throttled)" if r["throttled"] is None else
                 f"0x{r['throttled']:x}" + (f" ({', '.join(r['throttled_flags'])})" if r["throttled_flags"] else " (never)"))
    return [
        f"  board          {r['board_model'] or 'unknown'} ({r['arch']})",
        f"  cpu            {r['cpu_model'] or 'unknown'}; native bf16: {'yes' if r['native_bf16'] else 'no'}",
        f"  cores          {r['physical_cores']} physical, {r['logical_cores']} logical"
        + (f", {r['affinity_cores']} allowed" if r["affinity_cores"] is not None else "") + quota,
        f"  ram            {fmt_bytes(r['ram_total'])} total, {fmt_bytes(r['ram_available'])} available",
        "  swap           " + ("none" if r["swap_total"] == 0 else
                                  f"{fmt_bytes(r['swap_total'])} total, {fmt_bytes(r['swap_free'])} free"),
        f"  cgroup         {cgroup}",
        f"  temperature    {temperature}",
        f"  throttled      {throttled}",
    ]


def _facts_lines(f: dict[str, Any] | None) -> list[str]:
    if f is None:
        return ["  facts          unknown"]
    return [
        f"  architecture   {f['model_type'] or '?'}: {f['num_hidden_layers']} layers, hidden {f['hidden_size']},"
        f" {f['num_attention_heads']} heads / {f['num_key_value_heads']} kv heads x {f['head_dim']}, vocab {f['vocab_size']}",
        f"  parameters     {f['param_count'] / 1e6:.1f}M ({f['params_source']}),"
        f" tied embeddings: {'yes' if f['tie_word_embeddings'] else 'no'}",
        f"  files          {f['weight_files']} safetensors, {fmt_bytes(f['weight_bytes'])}"
        + (f" stored as {f['stored_dtype']}" if f["stored_dtype"] else ""),
    ]


def _plan_lines(p: dict[str, Any]) -> list[str]:
    lines = [
        f"  threads        {p['threads']} intra-op, {p['interop_threads']} inter-op",
        f"  dtype          {p['dtype']}, quantize {p['quantize']}",
        f"  weights        {p['quantize_why']}",
        *([f"  int8 product   {p['int8_kernel']}: {p['int8_kernel_why']}"] if p.get("int8_kernel") else []),
        f"  limits         max_batch {p['max_batch']}, max_context {p['max_context']},"
        f" max_generations {p['max_generations']}",
        f"  low memory at  {fmt_bytes(p['low_memory_bytes'])} available",
    ]
    if p["memory"] is not None:
        mem = p["memory"]
        parts = ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(mem[k])}"
                          for k in ("weights", "kv_cache", "activations", "runtime"))
        lines += [f"  memory         {fmt_bytes(mem['steady'])} serving ({parts}); {fmt_bytes(mem['load_peak'])} loading",
                  f"  usable         {fmt_bytes(p['budget']['usable'])}"]
    lines += [f"  verdict        {p['verdict']}", "", _wrap(p["explanation"], "  ")]
    lines += [f"  - {s}" for s in p["suggestions"]]
    return lines


def _wrap(text: str, indent: str, width: int = 100) -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, Path):
        return str(value)
    return value


def read_bench_speeds(paths: list[Path], quantize: str) -> dict[str, Speed]:
    """Built-in model name -> Speed from `llmqtt bench` result.json files; files for other models are ignored."""
    found = (speed_from_bench(json.loads(Path(p).read_text(encoding="utf-8")), quantize) for p in paths)
    return dict(f for f in found if f is not None)


def main(config: Config, as_json: bool = False, *, model_dir: Path | None = None,
         bench_results: list[Path] = ()) -> int:
    readings = read_system()
    # the scheme the daemon would load with on this board: the bench variant whose speed counts
    scheme, _ = choose_quantize(config.model.quantize, readings.arch, readings.cpu_flags, choose_dtype(config.model.dtype))
    report = build_report(config, model_dir, readings=readings,
                          measured=read_bench_speeds(list(bench_results), scheme))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    sys.stdout.flush()
    return 1 if is_fatal(report) else 0
