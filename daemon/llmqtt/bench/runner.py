"""`llmqtt bench`: every section in one run, one model, one machine; writes result.json + report.md + plot.

Order matters on a small board: one engine at a time (fp32, then the default config's engine: accuracy,
sentiment speed, chat; then bf16 in the mini run), each dropped before the next is built; the start-up
children and the llama.cpp peer (its own subprocess, on the same GGUF) run last, alone.
"""

from __future__ import annotations

import gc
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from ..config import Config
from ..engine.modelstore import BUILTIN_MODELS
from ..tasks import ClassifyTask, GenerateTask, load_tasks
from . import chat, conversation, data, llamacpp, mixed, speed, startup
from .accuracy import classify_rows


# name -> (dtype, quantize). fp32 is the reference; `default` is what an unchanged config runs (quantize:
# auto picks the scheme for this CPU); bf16 is there because CPUs with native bf16 (AVX512-BF16, AMX) run its
# matmuls several times faster. Accuracy runs on fp32 and default (the default must stay within a point).
VARIANTS = {"fp32": ("float32", "none"), "default": ("auto", "auto"), "bf16": ("bfloat16", "none")}
ACCURACY_VARIANTS = ("fp32", "default")
REPS = 3  # every speed figure is the median of this many runs


@dataclass(frozen=True)
class Sizes:
    name: str
    accuracy_rows: int  # per language, from the test split
    compare_rows: int  # per language: seeds' way vs classification path on the same rows (fp32)
    other_compare_rows: int  # the same for the other variants
    burst: int  # messages submitted at once to the queue
    chat_reps: int
    decode_tokens: int
    startup: bool  # measure start-up in subprocesses
    mixed_sentiments: int = 8  # sentiments per run of the mixed-load section, idle and while 2 chats stream
    bandwidth_bytes: int = 1 << 30  # the tensor read to measure memory bandwidth: far beyond the caches
    variants: tuple[str, ...] = tuple(VARIANTS)  # fp32 first: accuracy runs on it
    baseline_rows: int | None = None  # per language, of the fit rows the TF-IDF baseline trains on (None: all)


FULL = Sizes("full", accuracy_rows=500, compare_rows=24, other_compare_rows=24, burst=64, chat_reps=REPS,
             decode_tokens=64, startup=True, variants=("fp32", "default"), mixed_sentiments=20)
QUICK = Sizes("quick", accuracy_rows=100, compare_rows=3, other_compare_rows=8, burst=32, chat_reps=REPS,
              decode_tokens=32, startup=True, variants=("fp32", "default"))
MINI = Sizes("mini", accuracy_rows=4, compare_rows=2, other_compare_rows=1, burst=8, chat_reps=REPS,
             decode_tokens=4, startup=True, bandwidth_bytes=1 << 26, baseline_rows=200,
             mixed_sentiments=3)  # for tests, tiny model
# What `llmqtt bench --only` can run alone, on the default config's engine: `mixed` (the mixed-load section)
# or `served` (accuracy on the served path, single-request speed and the process's peak RSS: a second
# model's figures for `--compare` without the fp32 pass, which for the 1.5B is 7 GB and 3.7x the 0.5B's work).
SECTIONS = ("mixed", "served")

# Labelled data per classify task: language -> file in bench/data. Tasks not listed have none.
DATASETS = {"sentiment": {"en": "sentiment-en.jsonl", "zh": "sentiment-zh.jsonl"}}
# The rows a task's shipped head was fitted on (dev rows only, checked disjoint from the test rows): the
# TF-IDF baseline is trained on the same ones.
FIT_DATA = {"sentiment": "sentiment-fit.jsonl"}
SPEED_TASK = "sentiment"
CHAT_TASK = "chat"


def run(config: Config, sizes: Sizes, data_dir: Path | None = None, show_progress: bool = True,
        only: str | None = None) -> dict:
    """Every section; or with `only` (SECTIONS), the default config's engine alone with its single-request
    speed and that section: `mixed` (the mixed-load section) or `served` (served accuracy, peak RSS)."""
    from tqdm import tqdm

    from ..engine.modelstore import resolve_model

    data_dir = data_dir or data.repo_data_dir()
    tasks = load_tasks(config.prompt_dirs())
    resolved = resolve_model(config.model)
    rows = {task: {lang: data.load_rows(data_dir / name, "test", sizes.accuracy_rows) for lang, name in files.items()}
            for task, files in DATASETS.items() if task in tasks}
    fit_rows = {task: data.load_fit_rows(data_dir / name, [data_dir / f for f in DATASETS[task].values()])
                for task, name in FIT_DATA.items() if task in rows and (data_dir / name).is_file()}
    if only is not None:
        sizes = replace(sizes, variants=("default",), startup=False)
    started = time.perf_counter()
    total = _work_units(sizes, rows) if only is None else sizes.other_compare_rows * len(rows.get(SPEED_TASK, {})) + 2 + sizes.chat_reps
    with tqdm(total=total, unit="step", disable=not show_progress, smoothing=0) as bar:
        tick = bar.update
        result = {"meta": machine() | {"model": resolved.display_name, "mode": sizes.name, "sizes": asdict(sizes),
                                       "data": data_note(data_dir)}}
        result["variants"] = {}
        llama_work = None
        for name in sizes.variants:
            dtype, quantize = VARIANTS[name]
            bar.set_description(f"loading {name}")
            engine = _engine(resolved, config, tasks, dtype, quantize)
            result["meta"]["torch_threads"] = torch_threads()  # as planned for this machine by build_engine
            bar.set_description(f"fast decode {name}")
            _settle(engine)
            if only == "served":
                bar.set_description(f"accuracy {name}")
                result[f"accuracy_{name}"] = served_accuracy(engine, tasks, rows, tick)
            elif only is not None:
                pass
            elif name == "fp32":
                bar.set_description("accuracy fp32")
                result["accuracy"] = accuracy_section(engine, tasks, rows, fit_rows, sizes, tick)
            elif name in ACCURACY_VARIANTS:  # the default config, on the path the daemon serves
                bar.set_description(f"accuracy {name}")
                result[f"accuracy_{name}"] = served_accuracy(engine, tasks, rows, tick)
            compare = sizes.compare_rows if name == "fp32" else sizes.other_compare_rows
            result["variants"][name] = variant_section(engine, tasks, rows, sizes, compare, bar, only is not None)
            if name == "default":
                llama_work = llama_inputs(engine, rows, sizes) if only is None else None
                if only != "served":
                    bar.set_description("mixed load")
                    result["mixed"] = mixed_section(engine, tasks, rows, sizes, tick)
            del engine  # one model in memory at a time
            gc.collect()
        if only is not None:
            for variant in result["variants"].values():
                variant.pop("_bytes_per_token")
                # this process loaded only this engine, so its peak is the engine's serving peak
                variant["process_peak_rss_bytes"] = _peak_rss()
            result["meta"]["elapsed_s"] = time.perf_counter() - started
            result["meta"]["only"] = only
            return result
        bar.set_description("memory bandwidth")
        result["bandwidth_bytes_per_s"] = chat.memory_bandwidth(sizes.bandwidth_bytes)
        result["gemv_bytes_per_s"] = chat.gemv_bandwidth(sizes.bandwidth_bytes)
        for variant in result["variants"].values():
            _add_bound(variant, result["bandwidth_bytes_per_s"])
        bar.set_description("start-up (subprocesses)")
        result["startup"] = startup_section(resolved, config, sizes, tick)
        bar.set_description("llama.cpp")
        result["llama_cpp"] = llamacpp.peer_row(gguf_file(resolved, config), llama_work) if llama_work else {
            "available": False, "reason": "no default-config engine in this run"}
        tick(1)
    result["meta"]["elapsed_s"] = time.perf_counter() - started
    return result


def _engine(resolved, config: Config, tasks: dict, dtype: str, quantize: str):
    """Built as `llmqtt run` builds it (build_engine: planned threads, batch and context; prompt cache;
    warm-up), at this variant; then its fast decode kernels start, as the daemon's do once ready."""
    from ..build import build_engine

    wanted = {n: t for n, t in tasks.items() if n in DATASETS or n in (SPEED_TASK, CHAT_TASK)}
    model = config.model.model_copy(update={"dtype": dtype, "quantize": quantize})
    engine = build_engine(config.model_copy(update={"model": model}), wanted, resolved=resolved).engine
    engine.start_fast_decode()  # measured with the kernels a running daemon serves with: see variant_section
    return engine


def _settle(engine) -> None:
    """Let the background decode compile finish before anything runs: while it traces, torch.fx patches
    nn.Module.__call__ process-wide, and a classification on this thread then died mid-forward with
    "NameError: module is not installed as a submodule" (a quick bench, 2026-11-29 09:35)."""
    kernels = engine.loaded.kernels or (engine.decoder if engine.loaded.compile_decode else None)
    if kernels:
        kernels.wait(timeout=1800)


def accuracy_section(engine, tasks: dict, rows: dict, fit_rows: dict, sizes: Sizes, tick) -> dict:
    """Per classify task with data: the prompt's label logits, the learned head (if the task has one that
    fits this model) and the TF-IDF baseline, each on the same test rows; and head vs prompt latency."""
    out: dict = {}
    for name, task in tasks.items():
        if not isinstance(task, ClassifyTask):
            continue
        if name not in rows:
            out[name] = {"skipped": "no labelled data"}
            continue
        head = engine.head(name)
        section: dict = {"served": "head" if head else "prompt", "head": _head_note(head, fit_rows.get(name)),
                         "by_language": {}}
        for lang, test in rows[name].items():
            entry = {"prompt": classify_rows(engine, name, test, tick, use_head=False).summary()}
            if head:
                entry["head"] = classify_rows(engine, name, test, tick).summary()
            entry["tfidf"] = _tfidf(fit_rows.get(name), lang, test, list(task.labels), sizes.baseline_rows)
            section["by_language"][lang] = entry
        if head:
            sample = [r for lang_rows in rows[name].values() for r in lang_rows[:sizes.compare_rows]]
            section["latency"] = speed.head_vs_prompt_latency(engine, name, sample)
        out[name] = section
    return out


def served_accuracy(engine, tasks: dict, rows: dict, tick) -> dict:
    """Per classify task with data and language: accuracy on the path the daemon serves (engine.classify),
    and which read-out that is (`served`: the head and the scheme it was fitted under, or the prompt)."""
    def served(name: str) -> str:
        head = engine.head(name)
        return f"head fitted under {head.meta.get('scheme')}" if head is not None else "prompt"

    return {name: {lang: classify_rows(engine, name, test, tick).summary() | {"served": served(name)}
                   for lang, test in rows[name].items()}
            for name, task in tasks.items() if isinstance(task, ClassifyTask) and name in rows}


def _head_note(head, fit: data.FitRows | None) -> dict | None:
    """What the bench knows about a head: its metadata, and whether the baseline's rows are its rows."""
    if head is None:
        return None
    meta = {k: v for k, v in head.meta.items() if k not in ("prompt", "fitted_at")}
    meta["features"] = head.features.describe()
    meta["baseline_same_rows"] = fit is not None and head.meta.get("data", {}).get("sha256") == fit.sha256
    return meta


def _tfidf(fit: data.FitRows | None, lang: str, test: list, labels: list[str], limit: int | None) -> dict:
    train = [r for r in (fit.rows if fit else []) if r.lang == lang][:limit]
    if not train:
        return {"skipped": "no fit rows for this language"}
    try:
        from .baseline import tfidf_scored
    except ImportError:
        return {"skipped": "scikit-learn is not installed (pip install 'llmqtt[bench]')"}
    return {**tfidf_scored(train, test, labels).summary(), "train_rows": len(train)}


def variant_section(engine, tasks: dict, rows: dict, sizes: Sizes, compare_rows: int, bar,
                    single_only: bool = False) -> dict:
    """Sentiment speed (a, b, c; `single_only`: b alone) and chat speed for one loaded engine."""
    out: dict = {"dtype": engine.dtype, "weight_bytes": engine.loaded.weight_bytes,
                 "kv_cache_bytes": engine.decoder.cache_bytes()}
    kernels = engine.loaded.kernels or (engine.decoder if engine.loaded.compile_decode else None)
    if kernels:  # measure what a running daemon serves with, not the minutes after start
        kernels.wait(timeout=1800)
        out["fast_decode"] = {"state": kernels.state(), "compile_s": kernels.compile_s, "failed": kernels.failed,
                              "wrapper": getattr(kernels, "wrapper", None), "int8": engine.loaded.int8_kernel,
                              "kind": "one-row kernels" if engine.loaded.kernels else "whole decode step"}
    if SPEED_TASK in rows:
        bar.set_description(f"sentiment speed {engine.dtype}")
        by_lang = rows[SPEED_TASK].values()
        sample = [r for lang_rows in by_lang for r in lang_rows[:compare_rows]]
        burst_texts = _interleave([[r.text for r in lang_rows] for lang_rows in by_lang], sizes.burst)
        out["sentiment"] = (speed.classify_one_speed(engine, SPEED_TASK, sample, bar.update) if single_only else
                            speed.sentiment_speed(engine, SPEED_TASK, sample, burst_texts, bar.update))
    if isinstance(tasks.get(CHAT_TASK), GenerateTask):
        bar.set_description(f"chat speed {engine.dtype}")
        out["chat"] = chat.chat_speed(engine, engine.tasks[CHAT_TASK], sizes.chat_reps, sizes.decode_tokens,
                                      bar.update)
        if engine.dtype == "float32" and not single_only:  # the reuse saves prefill alike for every variant: once
            bar.set_description("conversation turn 2")
            out["conversation"] = conversation.turn_two(engine, CHAT_TASK, max(3, sizes.chat_reps), bar.update,
                                                        answer_tokens=min(32, 4 * sizes.decode_tokens))
    out["_bytes_per_token"] = chat.bytes_per_token(engine.loaded.model, engine.loaded.weight_bytes)
    return out


def mixed_section(engine, tasks: dict, rows: dict, sizes: Sizes, tick) -> dict:
    """Sentiment while chats stream, and 4 chats at once, through the service's step loop (bench/mixed.py)."""
    if not isinstance(tasks.get(CHAT_TASK), GenerateTask) or SPEED_TASK not in rows:
        return {"skipped": f"needs the {SPEED_TASK!r} and {CHAT_TASK!r} tasks and {SPEED_TASK} data"}
    texts = _interleave([[r.text for r in lang_rows] for lang_rows in rows[SPEED_TASK].values()],
                        sizes.mixed_sentiments)
    return mixed.mixed_load(engine, SPEED_TASK, CHAT_TASK, texts, sizes.chat_reps, sizes.decode_tokens, tick)


def _add_bound(variant: dict, bandwidth: float) -> None:
    per_token = variant.pop("_bytes_per_token")
    variant["bound"] = {"bytes_per_token": per_token, "tokens_per_s": bandwidth / per_token}
    if "chat" in variant:
        variant["chat"]["decode_pct_of_bound"] = 100 * variant["chat"]["decode_tokens_per_s"] / variant["bound"]["tokens_per_s"]


def startup_section(resolved, config: Config, sizes: Sizes, tick) -> dict:
    if not sizes.startup:
        return {"skipped": True}
    dirs, match = config.prompt_dirs(), resolved.match_name
    out = {mode: startup.measure(mode, resolved.path, dirs, match) for mode in ("bare", "bare_forward")}
    tick(1)
    with tempfile.TemporaryDirectory(prefix="llmqtt-bench-") as cache:
        for quantize, name in (("none", "fp32"), ("auto", "default")):
            # An empty prefix store: the first start computes the prefixes, the restart reads them.
            store = Path(cache) / name
            out[f"first_start_{name}"] = startup.measure("ready", resolved.path, dirs, match, quantize, store)
            out[f"ready_{name}"] = startup.measure("ready", resolved.path, dirs, match, quantize, store)
            tick(1)
    return out


def llama_inputs(engine, rows: dict, sizes: Sizes) -> dict | None:
    """The token ids llama.cpp runs, from this engine's own prompts (the same tokens both sides)."""
    from ..engine.generate import ChatGenerator

    scorer, chat_task = engine._scorers.get(SPEED_TASK), engine.tasks.get(CHAT_TASK)
    if scorer is None or not isinstance(chat_task, GenerateTask) or SPEED_TASK not in rows:
        return None
    sample = [r for lang_rows in rows[SPEED_TASK].values() for r in lang_rows[:sizes.compare_rows]]
    gen = ChatGenerator(engine.loaded.model, engine.loaded.tokenizer, chat_task, 2048, decoder=engine.decoder)
    decode_rest = gen.prompt_ids(chat.DECODE_PROMPT, [], 1)[0]
    return {"threads": torch_threads(), "reps": sizes.chat_reps, "decode_tokens": sizes.decode_tokens,
            "sentiment": {"prefix": scorer.prefix.ids, "rests": [scorer.rest_ids(r.text) for r in sample],
                          "gold": [r.label for r in sample], "labels": scorer.label_names,
                          "label_tokens": scorer.label_tokens},
            "chat": {"prefix": gen.prefix.ids, "rest": gen.prompt_ids(chat.TTFT_PROMPT, [], 1)[0],
                     "decode_prompt": gen.prefix.ids + decode_rest}}


def gguf_file(resolved, config: Config) -> Path | None:
    """The GGUF the model came from: the configured file, or a built-in model's, which sits beside its copy."""
    if config.model.name.endswith(".gguf"):
        return Path(config.model.name)
    return next(iter(sorted(resolved.path.parent.glob("*.gguf"))), None) if config.model.name in BUILTIN_MODELS else None


def _interleave(lists: list[list[str]], n: int) -> list[str]:
    """Round-robin over languages until n texts (repeating if the rows are fewer)."""
    flat = [x for group in zip(*lists) for x in group] or [x for group in lists for x in group]
    return [flat[i % len(flat)] for i in range(n)] if flat else []


def _work_units(sizes: Sizes, rows: dict) -> int:
    accuracy = (2 + len(ACCURACY_VARIANTS) - 1) * sum(len(r) for per_lang in rows.values() for r in per_lang.values())
    langs = len(rows.get(SPEED_TASK, {}))
    per_variant = lambda n: 2 * n * langs + (sizes.burst if langs else 0) + 2  # noqa: E731
    others = (len(sizes.variants) - 1) * per_variant(sizes.other_compare_rows)
    return accuracy + per_variant(sizes.compare_rows) + others + 3 * sizes.startup + 1 + sizes.chat_reps


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def machine() -> dict:
    import psutil
    import torch
    import transformers

    from ..readings import read_cpuinfo

    cpu = read_cpuinfo().model or platform.processor() or platform.machine()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch_threads(),
            "ram_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "platform": platform.platform()}


def data_note(data_dir: Path) -> dict:
    return {"dir": "bench/data", "seed": data.SEED, "split": f"per language: first {data.N_DEV} shuffled rows dev, "
            f"next {data.N_TEST} test; accuracy is on the first N rows of test", "files": dict(DATASETS)}
