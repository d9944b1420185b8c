"""Start-up time and peak memory, each measured in a fresh subprocess so nothing else is in its RSS.

`bare`:  AutoModelForCausalLM.from_pretrained at fp32, nothing else (the floor). transformers maps the
         safetensors file, so this does not yet read the weights: see its peak RSS.
`bare_forward`: the same plus one token through the model, which pages every weight in.
`ready`: what `llmqtt run` does before it serves (build.build_engine): plan, load (quantized weights from
         the model cache: the first start quantizes and stores them), every task's prefix cache, warm-up. Run
         twice on one empty prefix store: the first start computes and stores the prefixes, a restart (every
         start after the first, until the model or a prompt changes) reads them.

The clock starts after the imports (torch and transformers cost the same to both); the RSS after the
imports is reported too, so the model's own share is visible.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(mode: str, model_dir: Path, prompt_dirs: list[Path], match_name: str, quantize: str = "none",
            cache_dir: Path | None = None, timeout: float = 900) -> dict:
    """Run this module in a child process and return what it printed. `cache_dir` holds the prefix store."""
    cmd = [sys.executable, "-m", "llmqtt.bench.startup", mode, str(model_dir),
           os.pathsep.join(map(str, prompt_dirs)), match_name, quantize, str(cache_dir or "")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"mode": mode, "quantize": quantize, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(mode: str, model_dir: Path, prompt_dirs: str, match_name: str, quantize: str, cache_dir: str) -> dict:
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from ..build import build_engine
    from ..config import Config, ModelConfig
    from ..engine.modelstore import ResolvedModel
    from ..tasks import load_tasks

    tasks = load_tasks([Path(p) for p in prompt_dirs.split(os.pathsep)])
    after_imports = psutil.Process().memory_info().rss
    phases: dict = {}
    kernels = None
    start = time.perf_counter()
    if mode in ("bare", "bare_forward"):
        _import_model_code(model_dir)  # inside from_pretrained anyway: timed apart, as both starts pay it
        phases["model_code_s"] = time.perf_counter() - start
        phases["rss_after_model_code_bytes"] = psutil.Process().memory_info().rss
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        weight_bytes = _tensor_bytes(model)
        if mode == "bare_forward":  # one token through the model: every weight page read in from the file
            with torch.inference_mode():
                model(torch.tensor([[0]]))
    else:  # exactly what `llmqtt run` calls; its progress stages mark the phases
        marks: dict[str, float] = {}
        model = ModelConfig(name=str(model_dir), dtype="float32", quantize=quantize,
                            cache_dir=Path(cache_dir) if cache_dir else None, prefix_cache=bool(cache_dir))
        engine = build_engine(Config(model=model), tasks, resolved=ResolvedModel(model_dir, match_name, match_name),
                              progress=lambda stage, done, total: marks.setdefault(stage.split()[0], time.perf_counter()),
                              warm=True).engine
        ready = time.perf_counter()
        phases["load_s"] = marks["preparing"] - start
        phases["prefix_s"] = marks["warming"] - marks["preparing"]
        phases["tasks"], phases["prefixes_from_disk"] = len(tasks), engine.prefixes_from_disk()
        phases["warmup_s"] = ready - marks["warming"]
        phases["peak_rss_ready_bytes"] = peak_rss_bytes()  # before the compile below: what serving needed
        engine.start_fast_decode()  # as the daemon does, once ready
        weight_bytes = engine.loaded.weight_bytes
        phases["quantize"], phases["from_store"] = engine.loaded.quantize, engine.loaded.from_store
        phases["int8_kernel"], phases["tokenizer_s"] = engine.loaded.int8_kernel, engine.loaded.tokenizer_s
        phases["at_rest_bytes"] = at_rest_bytes(engine.loaded.model)
        phases["kv_cache_bytes"] = engine.decoder.cache_bytes()
        kernels = engine.loaded.kernels or (engine.decoder if engine.loaded.compile_decode else None)
    seconds = time.perf_counter() - start
    if kernels:  # compiled in the background after ready: when does decode get them? (peak RSS includes it)
        kernels.wait(timeout=1800)
        phases["fast_decode"] = kernels.state()
        phases["fast_decode_from_disk"] = getattr(kernels, "from_disk", False)  # the step a first start kept
        phases["fast_decode_ready_s"] = time.perf_counter() - start if kernels.ready.is_set() else None
    peak = peak_rss_bytes()
    if mode == "ready":  # after the peak is read: this second tokenizer's memory is not the start's
        phases["tokenizer_alone_s"] = _tokenizer_alone_s(model_dir)
    return {"mode": mode, "quantize": quantize, "seconds": seconds, **phases, "weight_bytes": weight_bytes,
            "peak_rss_bytes": peak, "rss_after_imports_bytes": after_imports,
            "rss_now_bytes": psutil.Process().memory_info().rss, **rss_split_bytes()}


def _import_model_code(model_dir: Path) -> None:
    """Import transformers' model code for this checkpoint's architecture (modeling_utils, the model's
    module, torch._dynamo through its mask code): ~2.5 s of the bare load's ~2.8 s on the bench machine."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]


def _tokenizer_alone_s(model_dir: Path) -> float:
    """The served tokenizer's load with every import done and nothing beside it: Python holding the GIL,
    which a start cannot overlap with the model code's import (also Python)."""
    from ..engine.loader import load_tokenizer

    started = time.perf_counter()
    load_tokenizer(model_dir)
    return time.perf_counter() - started


def _tensor_bytes(model) -> int:
    """Bytes of a float model's parameters and buffers (tied ones once). Not the loader's helper: importing
    engine/loader.py imports transformers' model code, which must stay inside the timed start-up."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def at_rest_bytes(model) -> int | None:
    """Size of the quantized file the model was built from (None for a float model)."""
    from ..engine.mapped import MappedFile

    weights = getattr(model, "_llmqtt_weights", None)
    return weights.nbytes() if isinstance(weights, MappedFile) else None


def rss_split_bytes() -> dict:
    """RSS now, split into anonymous memory (the process's own) and file-backed pages (here: the mapped
    checkpoint). File pages are clean: the kernel drops them under pressure instead of swapping or killing,
    so the anonymous part is what must fit in RAM."""
    status = _status_bytes()
    names = {"RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes"}
    return {names[key]: status[key] for key in names if key in status}


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not getrusage: Linux carries the parent's high-water mark across
    fork+exec into ru_maxrss, so a child of a big process would report the parent's peak."""
    peak = _status_bytes().get("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB elsewhere


def _status_bytes() -> dict[str, int]:
    """The kB fields of /proc/self/status, in bytes; empty where there is no /proc."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: int(rest.split()[0]) * 1024 for key, _, rest in (line.partition(":") for line in lines)
            if rest.strip().endswith("kB")}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:7])))
