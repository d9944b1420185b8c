"""torch + transformers inference. `load_engine` is the one entry point the daemon and CLI use.

Import `llmqtt.engine.types` for the result types without paying for the torch import.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

from ..config import ModelConfig, choose_dtype
from ..tasks import ClassifyTask, GenerateTask
from .modelstore import Progress, ResolvedModel, _no_progress, cache_dir_for, resolve_model

log = logging.getLogger(__name__)


def load_engine(config: ModelConfig, tasks: Mapping[str, ClassifyTask | GenerateTask], max_batch: int = 16,
                progress: Progress = _no_progress, resolved: ResolvedModel | None = None):
    """Resolve (fetch/convert if needed), load and prepare the model for `tasks`; returns an `Engine`."""
    from .engine import Engine
    from .loader import load
    from .prefixstore import PrefixStore, model_fingerprint

    resolved = resolved or resolve_model(config, progress)
    progress(f"loading {resolved.display_name}", 0, 0)
    dtype = choose_dtype(config.dtype)
    if config.fast_decode:
        # Inductor keeps compiled kernels on disk (so later starts are quick): in our cache, not /tmp, which
        # systemd's PrivateTmp empties at every start. Set before loading: transformers' import of torch's
        # compile machinery already fixes inductor's default. Compiling starts with engine.start_fast_decode().
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir_for(config) / "inductor"))
    loaded = load(resolved.path, dtype, config.quantize, config.fast_decode)
    store = None
    if config.prefix_cache:
        store = PrefixStore(cache_dir_for(config) / "prefix-kv", model_fingerprint(resolved.path, dtype, config.quantize))
    progress("preparing task prompts", 0, 0)
    engine = Engine(loaded, tasks, resolved.display_name, resolved.match_name, config.max_context, max_batch, store,
                    conversation_tokens=config.conversation_cache_tokens,
                    conversation_tolerant=config.conversation_cache_mode == "tolerant")
    if store:
        log.info("task prompt caches: %d of %d read from %s", engine.prefixes_from_disk(), len(tasks), store.directory)
    return engine
