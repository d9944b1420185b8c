"""Which hidden states a sentiment head should read: cross-validated accuracy per layer, pooling and C on the
fit rows (bench/data/sentiment-fit.jsonl; never a test row), per language. The table in docs/accuracy.md
("What was tried") came from these states, collected in parallel processes on a loaded machine.

    python bench/head_layers.py [ROWS_PER_LANGUAGE]     # fp32; the first N fit rows of each language

Each row runs once through the model behind the task's cached prefix (engine's own layer_states, the pass
stopped after layer 18), then every variant is a 5-fold cross-validation on those states: minutes of
model time per hundred rows on a 2-core machine, seconds per variant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llmqtt.bench.data import FIT_FILE, load_fit_rows
from llmqtt.config import ModelConfig
from llmqtt.engine import load_engine
from llmqtt.engine.fitting import collect
from llmqtt.engine.head import Features, cross_validate, folds
from llmqtt.tasks import load_tasks

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data"
LAYERS = [6, 8, 10, 12, 14, 15, 16, 18]


def main(per_language: int = 400) -> None:
    fit = load_fit_rows(DATA / FIT_FILE, [DATA / f"sentiment-{lang}.jsonl" for lang in ("en", "zh")])
    rows = [r for lang in ("en", "zh") for r in [r for r in fit.rows if r.lang == lang][:per_language]]
    task = load_tasks([REPO / "prompts"])["sentiment"]
    engine = load_engine(ModelConfig(dtype="float32", quantize="none", fast_decode=False), {"sentiment": task})
    states, kept, _ = collect(engine._scorer("sentiment"), [r.text for r in rows], LAYERS, engine.max_batch,
                              lambda n: None)
    rows = [rows[i] for i in kept]
    y = torch.tensor([list(task.labels).index(r.label) for r in rows])
    en = torch.tensor([r.lang == "en" for r in rows])
    held_out = folds(y, 5)
    print(f"{int(en.sum())} English + {int((~en).sum())} Chinese rows; cross-validated accuracy en / zh")
    variants = [(Features(((layer, "cue"), (layer, "mean"))), c) for layer in LAYERS for c in (0.001, 0.003)]
    variants += [(Features(((16, "cue"),)), 0.001), (Features(((16, "mean"),)), 0.001),
                 (Features(((15, "cue"), (15, "mean"), (18, "cue"), (18, "mean"))), 0.001)]
    for features, c in variants:
        right = cross_validate(features.pick(states).float(), y, 2, c, held_out).argmax(-1) == y
        print(f"{features.describe()}, C={c}: {100 * right[en].double().mean():.1f} / "
              f"{100 * right[~en].double().mean():.1f} %", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
