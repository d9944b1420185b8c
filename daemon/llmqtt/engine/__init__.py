"""torch + transformers inference. `load_engine` is the one entry point the daemon and CLI use.

Import `llmqtt.engine.types` for the result types without paying for the torch import.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

from ..config import ModelConfig, choose_dtype, choose_quantize
from ..readings import read_cpuinfo
from ..tasks import ClassifyTask, GenerateTask
from .modelstore import COMPLETE_MARKER, Progress, ResolvedModel, _no_progress, cache_dir_for, resolve_model

log = logging.getLogger(__name__)


def _serve_without_torchao_in_transformers() -> None:
    """transformers imports torchao whenever it is installed (for checkpoints quantized by torchao, which
    llmqtt never loads): +82 MB of RSS and ~1.5 s of every start on the bench machine (2026-11-29). llmqtt
    needs torchao only to quantize a model the first time (quantize.py imports it itself), so transformers is
    told it is absent. Must run before transformers' modeling code is imported; harmless if it already was."""
    import transformers.utils as hf_utils
    import transformers.utils.import_utils as hf_imports

    hf_utils.is_torchao_available = hf_imports.is_torchao_available = lambda *args, **kwargs: False


def load_engine(config: ModelConfig, tasks: Mapping[str, ClassifyTask | GenerateTask], max_batch: int = 16,
                progress: Progress = _no_progress, resolved: ResolvedModel | None = None,
                heads: Mapping[str, list[Path]] | None = None):
    """Resolve (fetch/convert if needed), load and prepare the model for `tasks`; returns an `Engine`.

    `heads`: task name -> its learned head files (`llmqtt fit`); the first fitted for this model and compute
    scheme serves; if none fits, the task answers from its prompt (the reasons are logged)."""
    if config.fast_decode:
        # Inductor keeps compiled kernels on disk (so later starts are quick): in our cache, not /tmp, which
        # systemd's PrivateTmp empties at every start. Set before the imports below: importing transformers'
        # model code sets inductor's default. Compiling starts with engine.start_fast_decode().
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir_for(config) / "inductor"))
    # llmqtt's int8 kernel is built once per machine (kernels.py), kept beside the other caches
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir_for(config) / "kernels"))
    from .quantstore import EarlyPacking, QuantizedStore, drop_float32  # torch, not transformers

    resolved = resolved or resolve_model(config, progress)
    progress(f"loading {resolved.display_name}", 0, 0)
    dtype = choose_dtype(config.dtype)
    scheme, why = quantize_scheme(config, dtype)
    log.info("weights: %s (%s)", scheme if scheme != "none" else dtype, why)
    quantized = QuantizedStore(cache_dir_for(config) / "quantized")
    # fbgemm packs the stored weights (~3 s, outside the GIL) while the imports below run (~2.5 s, in it)
    early = EarlyPacking.start(quantized, resolved.path, scheme)
    _serve_without_torchao_in_transformers()
    from .decode import saved_step_stem
    from .engine import Engine
    from .loader import load
    from .headfile import weights_fingerprint
    from .prefixstore import PrefixStore, model_fingerprint

    loaded = load(resolved.path, dtype, scheme, config.fast_decode, quantized, early)
    if (scheme != "none" and not config.keep_float32 and (resolved.path / COMPLETE_MARKER).is_file()
            and quantized.path(resolved.path, scheme).is_file()):
        drop_float32(resolved.path)  # the quantized copy is stored; only a checkpoint llmqtt converted itself
    fingerprint = model_fingerprint(resolved.path, dtype, scheme)
    store = PrefixStore(cache_dir_for(config) / "prefix-kv", fingerprint) if config.prefix_cache else None
    decode_step = None
    if config.fast_decode:  # kept beside inductor's cache, which holds the kernels it calls
        decode_step = saved_step_stem(cache_dir_for(config) / "decode", fingerprint, config.max_context,
                                      loaded.int8_kernel)
    progress("preparing task prompts", 0, 0)
    engine = Engine(loaded, tasks, resolved.display_name, resolved.match_name, config.max_context, max_batch, store,
                    conversation_tokens=config.conversation_cache_tokens,
                    conversation_tolerant=config.conversation_cache_mode == "tolerant",
                    heads=_load_heads(heads or {}, tasks), weights=weights_fingerprint(resolved.path),
                    decode_step=decode_step)
    if store:
        log.info("task prompt caches: %d of %d read from %s", engine.prefixes_from_disk(), len(tasks), store.directory)
    return engine


def quantize_scheme(config: ModelConfig, dtype: str) -> tuple[str, str]:
    """(scheme, why) for this machine's CPU: `model.quantize` with `auto` resolved."""
    import platform

    return choose_quantize(config.quantize, platform.machine(), read_cpuinfo().flags, dtype)


def _load_heads(paths: Mapping[str, list[Path]], tasks: Mapping) -> dict[str, list]:
    """Each classify task's head files that read (the engine picks the one that fits); a broken one is
    skipped with a warning."""
    from .head import HeadFileError, load_head

    heads = {}
    for name, files in paths.items():
        if name not in tasks or tasks[name].kind != "classify":
            continue
        for path in files:
            try:
                heads.setdefault(name, []).append(load_head(path))
            except HeadFileError as exc:
                log.warning("task %r: not using the learned head %s", name, exc)
    return heads
