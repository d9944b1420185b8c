"""How far can any read-out of llmqtt's one forward pass go? An accuracy ceiling for the sentiment task.

Runs the shipped sentiment prompt (cached prefix + text + answer cue) over labelled rows and keeps the
model's hidden state at the answer cue, the vector the label logits are read from. Then, on the dev rows
only, it fits (1) one logit offset per language, (2) a logistic regression over the logits of 20 label-like
words (calibration of the label scores), and (3) a linear probe over the whole hidden state: the most any
linear read-out of this forward pass could do. Reported on the bench's test rows (the first 500 per language,
as the full bench).

Dev rows: the sample's 300 dev rows plus the rows that follow the sample in the same seeded shuffle
(600 English, 900 Chinese), so it needs the source files: `python bench/ceiling.py ../shared/data`.
Takes ~25 min on 2 cores (fp32). Not part of the test suite; results are in docs/accuracy.md.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from llmqtt.bench.data import SEED, SOURCES
from llmqtt.config import ModelConfig
from llmqtt.engine import load_engine
from llmqtt.engine.classify import length_chunks
from llmqtt.engine.types import EngineError
from llmqtt.tasks import load_tasks

REPO = Path(__file__).resolve().parents[1]
EXTRA = {"en": 600, "zh": 900}
WORDS = ["positive", "Positive", " positive", "good", "Good", "正面", "好", "积极", "yes", "pos",
         "negative", "Negative", " negative", "bad", "Bad", "负面", "差", "消极", "no", "neg"]


def rows(source: Path, lang: str) -> list[tuple[str, bool, str]]:
    """(text, is positive, split) in the bench's seeded order: dev, test, then extra dev rows."""
    all_rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(SEED).shuffle(all_rows)
    split = lambda i: "dev" if i < 300 or i >= 900 else "test"  # noqa: E731
    return [(r["text"], r["label"] == "positive", split(i)) for i, r in enumerate(all_rows[:900 + EXTRA[lang]])]


def served_ids(scorer, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
    """Each text's ids after the cached prefix, and whether the task serves it (too long: a stand-in [0],
    counted wrong, as the bench does)."""
    ids, ok = [], []
    for text in texts:
        try:
            ids.append(scorer.rest_ids(text))
            ok.append(True)
        except EngineError:
            ids.append([0])
            ok.append(False)
    return ids, ok


def cue_states(scorer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden state at the answer cue per text [N, H] (the engine's own batched pass), and which texts fit
    the context."""
    ids, ok = served_ids(scorer, texts)
    states = torch.zeros(len(texts), scorer.model.config.hidden_size)
    for chunk in length_chunks([len(r) for r in ids], 16):
        states[chunk] = scorer.cue_states([ids[i] for i in chunk]).float()
    return states, torch.tensor(ok)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, c: float):
    """L2-regularised logistic regression on standardised features (L-BFGS); returns a predict function."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = ((x - mu) / sd).double()
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.double()) + w @ w / (2 * c * len(y))
        value.backward()
        return value

    opt.step(loss)
    return lambda q: (((q - mu) / sd).double() @ w.detach() + b.detach()) > 0


def main(source_dir: Path) -> None:
    engine = load_engine(ModelConfig(dtype="float32"), {"sentiment": load_tasks([REPO / "prompts"])["sentiment"]})
    scorer = engine._scorers["sentiment"]
    head = engine.loaded.model.get_output_embeddings().weight.detach().float()
    first = lambda w: engine.loaded.tokenizer.encode(w, add_special_tokens=False)[0]  # noqa: E731
    words = sorted({first(w) for w in WORDS})
    pos, neg = first("positive"), first("negative")
    for lang, name in SOURCES.items():
        data = rows(source_dir / name, lang)
        states, ok = cue_states(scorer, [t for t, _, _ in data])
        y = torch.tensor([p for _, p, _ in data])
        dev = torch.tensor([s == "dev" for _, _, s in data]) & ok
        test = torch.tensor([s == "test" for _, _, s in data])
        test &= torch.cumsum(test.int(), 0) <= 500
        acc = lambda pred: float(((pred == y) & ok)[test].float().mean())  # noqa: E731
        margin = states @ (head[pos] - head[neg])
        offsets = torch.arange(-3, 3.001, 0.05)
        best = max(offsets.tolist(), key=lambda o: float(((margin + o > 0) == y)[dev].float().mean()))
        logits = states @ head[words].T
        print(f"{lang}: dev rows {int(dev.sum())}, test rows {int(test.sum())}")
        shipped = float(scorer._calibration[0] - scorer._calibration[1])
        print(f"  shipped calibration ({shipped:+.2f}): {acc(margin + shipped > 0):.3f}")
        print(f"  own offset {best:+.2f}: {acc(margin + best > 0):.3f}")
        for c in (0.1, 1.0):
            print(f"  label-word calibration (C={c}): {acc(fit_logistic(logits[dev], y[dev], c)(logits)):.3f}")
        for c in (0.01, 0.1):
            print(f"  linear probe on the hidden state (C={c}): {acc(fit_logistic(states[dev], y[dev], c)(states)):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else REPO.parent / "shared" / "data"))
