"""The shipped sentiment head beside the prompt and the TF-IDF baseline, in one pass over the test rows.

`llmqtt bench` reports the same three read-outs, with one pass over the test rows per read-out; this runs
each test text once (the full forward, catching the head's layers on the way), so it also fits a loaded
2-core machine, and it can run under any dtype/quantization to see how a head fitted under one scheme
holds under another:

    python bench/head_check.py                 # fp32
    python bench/head_check.py float32 int8    # the same head on int8 weights

Test rows: the first 500 per language of the bench's test split (as the full bench). The TF-IDF baseline
is trained on the head's own rows (bench/data/sentiment-fit.jsonl). Results are in docs/accuracy.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from ceiling import served_ids  # bench/ is this script's directory

from llmqtt.bench.baseline import tfidf_scored
from llmqtt.bench.data import FIT_FILE, load_fit_rows, load_rows
from llmqtt.config import ModelConfig
from llmqtt.engine import load_engine
from llmqtt.engine.classify import length_chunks
from llmqtt.engine.head import load_head
from llmqtt.engine.headfile import head_path
from llmqtt.tasks import load_tasks

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data"


def one_pass(scorer, head, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt probabilities [N, labels], head probabilities [N, labels], served [N]) in the task's label
    order, from one forward per chunk; a text the task refuses (too long) is not served (counted wrong)."""
    ids, served = served_ids(scorer, texts)
    layers = scorer.model.base_model.layers
    order = [head.labels.index(name) for name in scorer.label_names]
    prompt, learned = torch.zeros(len(texts), len(order)), torch.zeros(len(texts), len(order))
    for chunk in length_chunks([len(r) for r in ids], 16):
        rows = [ids[i] for i in chunk]
        caught: dict[int, torch.Tensor] = {}
        hooks = [layers[i - 1].register_forward_hook(
            lambda module, args, out, i=i: caught.__setitem__(i, out[0] if isinstance(out, tuple) else out))
            for i in head.features.layers]
        lengths = torch.tensor([len(r) for r in rows])
        try:
            with torch.inference_mode():
                last = scorer.model.base_model(**scorer._inputs(rows)).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        cue = last[torch.arange(len(rows)), lengths - 1]
        prompt[chunk] = torch.softmax(scorer._per_label(scorer._head_rows(cue).float()) + scorer._calibration, -1)
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).unsqueeze(-1)
        states = {}
        for layer, pool in head.features.parts:
            h = caught[layer].float()
            states[(layer, pool)] = h[torch.arange(len(rows)), lengths - 1] if pool == "cue" else (h * mask).sum(1) / lengths[:, None]
        learned[chunk] = head.probabilities(head.features.pick(states))[:, order]
    return prompt, learned, torch.tensor(served)


def main(dtype: str = "float32", quantize: str = "none") -> None:
    task = load_tasks([REPO / "prompts"])["sentiment"]
    head = load_head(head_path(REPO / "prompts" / "sentiment.yaml"))
    engine = load_engine(ModelConfig(dtype=dtype, quantize=quantize, fast_decode=False), {"sentiment": task})
    scorer = engine._scorers["sentiment"]
    print(f"{engine.model_name}, {engine.dtype}; head: {head.features.describe()}, {head.meta['rows']} rows, "
          f"fitted under {head.meta['scheme']}, cross-validated {100 * head.meta['cv_accuracy']:.1f} %")
    if head.meta["fingerprint"] != engine.weights or head.meta["prompt"] != scorer.prompt_fingerprint():
        sys.exit("the head does not fit this model or prompt; re-fit it")
    fit = load_fit_rows(DATA / FIT_FILE, [DATA / f"sentiment-{lang}.jsonl" for lang in ("en", "zh")])
    print("| language | rows | prompt | head | TF-IDF (same rows as the head) | head: mean score, ECE |")
    print("|---|---|---|---|---|---|")
    for lang in ("en", "zh"):
        test = load_rows(DATA / f"sentiment-{lang}.jsonl", "test", 500)
        started = time.perf_counter()
        prompt, learned, served = one_pass(scorer, head, [r.text for r in test])
        gold = torch.tensor([scorer.label_names.index(r.label) for r in test])
        right = {name: (p.argmax(-1) == gold) & served for name, p in (("prompt", prompt), ("head", learned))}
        train = [r for r in fit.rows if r.lang == lang]
        tfidf = tfidf_scored(train, test, scorer.label_names).summary()["accuracy"]
        score = learned.max(-1).values
        bins = torch.clamp((score * 10).long(), max=9)  # expected calibration error over 10 score bins
        ece = sum(abs(float(score[bins == b].sum() - right["head"][bins == b].float().sum())) for b in range(10)) / len(test)
        print(f"| {lang} | {len(test)} | {100 * right['prompt'].float().mean():.1f} % | "
              f"{100 * right['head'].float().mean():.1f} % | {100 * tfidf:.1f} % ({len(train)} rows) | "
              f"{float(score.mean()):.3f}, {ece:.3f} |  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
