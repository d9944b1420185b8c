"""result dict -> result.json, report.md and bench.png; and the targets the issue set, met or missed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

PLOT = "bench.png"
PATHS = [("seeds_way", "(a) seeds' way: full prompt + generate + parse"),
         ("classify_one", "(b) classification path, one message"),
         ("burst", "(c) burst through the queue, batched")]


def _get(result: dict, *keys):
    """result[k1][k2]... or None when any step is missing (a section that was skipped or failed)."""
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def _div(a, b):
    return a / b if a is not None and b else None


# (name, goal text, value getter, is the goal met for this value)
TARGETS: list[tuple[str, str, Callable[[dict], float | None], Callable[[float], bool]]] = [
    ("sentiment accuracy, English", ">= 92 %", lambda r: _get(r, "accuracy", "sentiment", "en", "accuracy"), lambda v: v >= 0.92),
    ("sentiment accuracy, Chinese", ">= 90 %", lambda r: _get(r, "accuracy", "sentiment", "zh", "accuracy"), lambda v: v >= 0.90),
    ("classification path vs seeds' way, per message (b/a)", ">= 5x",
     lambda r: _get(r, "variants", "fp32", "sentiment", "b_over_a"), lambda v: v >= 5),
    ("burst of 64 vs seeds' throughput (c/a)", ">= 8x",
     lambda r: _get(r, "variants", "fp32", "sentiment", "c_over_a"), lambda v: v >= 8),
    ("chat first token, cached vs recomputed prompt", ">= 3x",
     lambda r: _get(r, "variants", "fp32", "chat", "first_token_speedup"), lambda v: v >= 3),
    ("chat turn 2 first token, KV reuse across requests vs none", ">= 2x",
     lambda r: _get(r, "variants", "fp32", "conversation", "speedup_same_system"), lambda v: v >= 2),
    ("decode vs memory-bandwidth bound", ">= 60 %",
     lambda r: _get(r, "variants", "fp32", "chat", "decode_pct_of_bound"), lambda v: v >= 60),
    ("peak RSS / weights' bytes (ready, fp32)", "<= 1.3x",
     lambda r: _div(_get(r, "startup", "ready_fp32", "peak_rss_bytes"), _get(r, "startup", "ready_fp32", "weight_bytes")),
     lambda v: v <= 1.3),
    ("time to ready / bare from_pretrained (fp32, restart: prompt caches on disk)", "<= 2x",
     lambda r: _div(_get(r, "startup", "ready_fp32", "seconds"), _get(r, "startup", "bare", "seconds")),
     lambda v: v <= 2),
]


def targets(result: dict) -> list[dict]:
    out = []
    for name, goal, value_of, met in TARGETS:
        value = value_of(result)
        ok = None if value is None else bool(met(value))
        out.append({"target": name, "goal": goal, "value": value, "met": ok,
                    "why": _why(name, result) if ok is False else ""})
    return out


def _why(target: str, r: dict) -> str:
    """The structural reason a target is missed, with this run's numbers where they explain it."""
    try:
        if "English" in target:
            return ("the model's own reading of these texts is the limit: a linear probe on the hidden state at the "
                    "answer cue, fitted on 900 dev rows (more than any prompt or calibration can use), reaches 92.6 % "
                    "on the same test rows; label-word calibration fitted the same way 91.8 %; see docs/accuracy.md")
        if "Chinese" in target:
            return ("a linear probe on the hidden state at the answer cue, fitted on 1,200 dev rows, reaches only "
                    "84.6 % on the same test rows, so no prompt or calibration of this model gets near 90 %; about "
                    "half the errors read are review fragments whose label belongs to the whole review; see "
                    "docs/accuracy.md")
        if "burst" in target:
            b = r["variants"]["fp32"]["sentiment"]["burst"]
            one = r["variants"]["fp32"]["sentiment"]["classify_one"]
            return (f"one forward is already compute-bound on CPU, so a batch costs about its tokens: the burst ran "
                    f"{b['per_s']:.2f} msg/s vs {one['per_s']:.2f} one at a time, computing {b['padded_tokens']} "
                    f"tokens (with padding) for {b['text_tokens']} text tokens in {b['forward_calls']} forward passes; "
                    "c/a can only reach about b/a times the gain of larger matrix products")
        if "turn 2" in target:
            c = r["variants"]["fp32"]["conversation"]
            return (f"turn 2 ran {c['same_system']['tokens_run']} of {c['off']['tokens_run']} tokens with reuse; the "
                    f"first token also pays one decode step and tokenizing the {c['prompt_tokens']}-token prompt, so "
                    f"the ceiling is below {c['off']['tokens_run'] / max(1, c['same_system']['tokens_run']):.1f}x")
        if "first token" in target:
            c = r["variants"]["fp32"]["chat"]
            ceiling = (c["prefix_tokens"] + c["rest_tokens"]) / c["rest_tokens"]
            return (f"prefill is compute-bound, so the ceiling is (prefix + user) / user tokens = {ceiling:.1f}x "
                    f"for the shipped {c['prefix_tokens']}-token chat prefix")
        if "decode" in target:
            gemv, bw = r["gemv_bytes_per_s"], r["bandwidth_bytes_per_s"]
            if r["variants"]["fp32"].get("fast_decode", {}).get("state") == "ready":
                return ("with the compiled decode kernels the matrix-vector products read near the bandwidth; the "
                        "rest of each step (attention over the growing KV cache, norms, the Python loop) is the gap")
            return (f"torch's fp32 matrix-vector product reads a weight matrix at {gemv / 1e9:.1f} GB/s here, "
                    f"{100 * gemv / bw:.0f} % of the {bw / 1e9:.1f} GB/s a plain sum reads, so decode with these kernels "
                    f"cannot pass about {100 * gemv / bw:.0f} % of the bound; the loop, attention and the growing KV "
                    "cache add the rest")
        if "RSS" in target:
            bare = r["startup"]["bare_forward"]
            return (f"from_pretrained plus one forward peaks at {bare['peak_rss_bytes'] / bare['weight_bytes']:.2f}x "
                    "(bare_forward row); RSS once ready is "
                    f"{r['startup']['ready_fp32']['rss_now_bytes'] / 1e9:.2f} GB")
        if "ready" in target:
            st = r["startup"]
            s = st["ready_fp32"]
            return (f"bare maps the checkpoint without reading it ({st['bare']['seconds']:.1f} s; with one forward "
                    f"{st['bare_forward']['seconds']:.1f} s); a restart loads ({s['load_s']:.1f} s, tokenizer "
                    f"included), reads the prefix caches ({s['prefix_s']:.1f} s) and warms up ({s['warmup_s']:.1f} s)")
    except (KeyError, TypeError, ZeroDivisionError):
        pass
    return ""


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "targets": targets(result)}
    paths = {"json": out_dir / "result.json", "markdown": out_dir / "report.md", "plot": out_dir / PLOT}
    paths["json"].write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    plot(result, paths["plot"])
    paths["markdown"].write_text(markdown(result), encoding="utf-8")
    return paths


# -- Markdown ---------------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    m = r["meta"]
    parts = [f"# llmqtt bench ({m['mode']})\n",
             f"Model **{m['model']}**: fp32 (reference), int8 (`model.quantize: int8`, dynamic, Linear layers) and "
             f"bf16 (`model.dtype: bfloat16`). Machine: {m['cpu']}, {m['cores']} cores "
             f"(torch threads {m['torch_threads']}), {_gb(m['ram_bytes'])} RAM; Python {m['python']}, torch "
             f"{m['torch']}, transformers {m['transformers']}; {m['date']}; run took {m.get('elapsed_s', 0) / 60:.1f} min.\n",
             "All ratios are from this one run on this machine; absolute numbers move with machine load.\n",
             _targets_md(r), _accuracy_md(r), _sentiment_md(r), _chat_md(r), _conversation_md(r), _startup_md(r),
             _llama_md(r),
             f"![latency and throughput]({PLOT})\n"]
    return "\n".join(p for p in parts if p)


def _targets_md(r: dict) -> str:
    lines = ["## Targets\n", "| target | goal | this run | met | why, where missed |", "|---|---|---|---|---|"]
    for t in r["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else f"**no** ({shortfall(t)})")
        value = fmt_target(t)
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {met} | {t['why']} |")
    return "\n".join(lines) + "\n"


def shortfall(t: dict) -> str:
    """How far a missed target is: points for a percentage goal, else relative to the goal."""
    goal = float(re.search(r"[\d.]+", t["goal"]).group())
    if "%" in t["goal"]:
        value = 100 * t["value"] if "accuracy" in t["target"] else t["value"]
        return f"by {abs(goal - value):.1f} points"
    return f"by {100 * abs(t['value'] - goal) / goal:.0f} %"


def fmt_target(t: dict) -> str:
    v = t["value"]
    if v is None:
        return "not measured"
    return f"{100 * v:.1f} %" if "accuracy" in t["target"] else (f"{v:.1f} %" if "%" in t["goal"] else f"{v:.2f}x")


def _accuracy_md(r: dict) -> str:
    d = r["meta"]["data"]
    lines = ["## Accuracy\n", f"Test split of the seeded sample in `{d['dir']}` (seed {d['seed']}; {d['split']}). "
             "Prompts were tuned on the dev split only. fp32, classification path.\n"]
    for task, per_lang in r.get("accuracy", {}).items():
        if "skipped" in per_lang:
            lines.append(f"- `{task}`: {per_lang['skipped']}\n")
            continue
        for lang, s in per_lang.items():
            refused = f" ({s['no_label']} refused as too long, counted wrong)" if s["no_label"] else ""
            lines.append(f"**{task} / {lang}**: {100 * s['accuracy']:.1f} % of {s['n']}{refused}\n")
            lines.append(_confusion_md(s["confusion"]))
    return "\n".join(lines) + "\n"


def _confusion_md(confusion: dict) -> str:
    columns = [c for c in next(iter(confusion.values())) if c != "none" or any(row["none"] for row in confusion.values())]
    lines = ["| gold \\ predicted | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for gold, row in confusion.items():
        lines.append(f"| {gold} | " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _sentiment_md(r: dict) -> str:
    lines = ["## Sentiment speed\n", "(a) and (b) run the same rows one at a time (first rows of each language's "
             "test split), so their accuracies compare; (c) submits a burst to `service.Service` at once.\n",
             "| weights | path | n | p50 ms | p95 ms | msg/s | accuracy |", "|---|---|---|---|---|---|---|"]
    ratios = []
    for name, v in r.get("variants", {}).items():
        s = v.get("sentiment")
        if not s:
            continue
        for key, label in PATHS:
            p = s[key]
            acc = f"{100 * p['accuracy']:.1f} %" if "accuracy" in p else "-"
            lines.append(f"| {name} | {label} | {p['n']} | {_n(p['p50_ms'], 0)} | {_n(p['p95_ms'], 0)} | "
                         f"{_n(p['per_s'], 2)} | {acc} |")
        ratios.append(f"- {name}: b/a = **{_n(s['b_over_a'], 1)}x** throughput (p50 latency a/b {_n(s['p50_a_over_b'], 1)}x), "
                      f"c/a = **{_n(s['c_over_a'], 1)}x** (burst batch {s['burst']['batch']}, errors {s['burst']['errors']})")
    return "\n".join(lines + [""] + ratios) + "\n"


def _chat_md(r: dict) -> str:
    bw = r.get("bandwidth_bytes_per_s")
    lines = ["## Chat speed\n", f"Memory bandwidth measured in this run (best of 5 sums of a "
             f"{_gb(r['meta']['sizes']['bandwidth_bytes'])} tensor): "
             f"**{_n(bw and bw / 1e9, 1)} GB/s**; one fp32 matrix-vector product (F.linear, 1 row) over a matrix of the "
             f"same size: **{_n(r.get('gemv_bytes_per_s') and r['gemv_bytes_per_s'] / 1e9, 1)} GB/s**. "
             "Bound = bandwidth / weight bytes read per token. Decode kernels: `compiled` = `model.fast_decode` "
             "(default for fp32: one-row products through a compiled multiply-and-sum, engine/fastdecode.py), "
             "`torch` = torch's own (int8, bf16).\n",
             "| weights | decode kernels | prefix tok | user tok | first token cached ms | recomputed ms | speed-up | "
             "decode tok/s | bound tok/s | of bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in r.get("variants", {}).items():
        c, b = v.get("chat"), v.get("bound", {})
        if not c:
            continue
        kernels = v.get("fast_decode", {}).get("state")
        kernels = "compiled" if kernels == "ready" else f"torch ({kernels})" if kernels else "torch"
        lines.append(f"| {name} | {kernels} | {c['prefix_tokens']} | {c['rest_tokens']} | {_n(c['first_token_cached_ms'], 0)} | "
                     f"{_n(c['first_token_recomputed_ms'], 0)} | {_n(c['first_token_speedup'], 2)}x | "
                     f"{_n(c['decode_tokens_per_s'], 2)} | {_n(b.get('tokens_per_s'), 2)} | "
                     f"{_n(c.get('decode_pct_of_bound'), 0)} % |")
    return "\n".join(lines) + "\n"


def _conversation_md(r: dict) -> str:
    lines = ["## Conversation turn 2 (HTTP clients resend the history)\n",
             "First token of turn 2 (median of the runs; each after a fresh turn 1 with a 32-token answer): the "
             "conversation cache off; on with the same system prompt (ollama/openai clients, the web page); on with "
             "the system prompt's time stamp moved on, as Home Assistant renders it each turn (exact reuse stops "
             "there). `tokens run` = prompt tokens computed for turn 2.\n",
             "| weights | prompt tok | off ms (tok run) | same system ms (tok run) | speed-up | new time ms (tok run) | "
             "speed-up |", "|---|---|---|---|---|---|---|"]
    for name, v in r.get("variants", {}).items():
        c = v.get("conversation")
        if not c:
            continue
        lines.append(f"| {name} | {c['prompt_tokens']} | {_n(c['off']['first_token_ms'], 0)} ({c['off']['tokens_run']}) | "
                     f"{_n(c['same_system']['first_token_ms'], 0)} ({c['same_system']['tokens_run']}) | "
                     f"{_n(c['speedup_same_system'], 2)}x | {_n(c['new_time']['first_token_ms'], 0)} "
                     f"({c['new_time']['tokens_run']}) | {_n(c['speedup_new_time'], 2)}x |")
    return "\n".join(lines) + "\n"


def _startup_md(r: dict) -> str:
    s = r.get("startup", {})
    if s.get("skipped"):
        return ""
    lines = ["## Start-up and memory\n", "Each row is a fresh subprocess; the clock starts after the imports. "
             "Peak RSS (VmHWM) includes torch's own (RSS after imports shown). `bare` maps the checkpoint without "
             "reading it; `bare_forward` adds one token through the model, which pages the weights in. "
             "`first_start_*` is the first start with these prompts (every task's prefix computed and stored in the "
             "prompt cache); `ready_*` is every later start (prefixes read from disk).\n",
             "`fast decode from`: when the compiled decode kernels (built in the background after ready) took "
             "over; peak RSS includes them. `anonymous` is the RSS once ready that is the process's own memory; "
             "the rest are clean pages of the "
             "mapped checkpoint, which the kernel drops under memory pressure (int8 keeps the fp32 file mapped "
             "after quantizing, so its RSS looks far larger than what it needs).\n",
             "| what | seconds | load | prefix caches | warm-up | weights | peak RSS | peak / weights | RSS after imports | "
             "(peak - imports) / weights | RSS ready | anonymous | anonymous / weights | fast decode from |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in s.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |||||||")
            continue
        lines.append(f"| {name} | {row['seconds']:.1f} | {_n(row.get('load_s'), 1)} | {_n(row.get('prefix_s'), 1)} | "
                     f"{_n(row.get('warmup_s'), 1)} | {_gb(row['weight_bytes'])} | {_gb(row['peak_rss_bytes'])} | "
                     f"{row['peak_rss_bytes'] / row['weight_bytes']:.2f}x | {_gb(row['rss_after_imports_bytes'])} | "
                     f"{(row['peak_rss_bytes'] - row['rss_after_imports_bytes']) / row['weight_bytes']:.2f}x | "
                     f"{_gb(row['rss_now_bytes'])} | {_gb(row.get('rss_anon_bytes'))} | "
                     f"{_x(_div(row.get('rss_anon_bytes'), row['weight_bytes']))} | "
                     f"{_fast_decode_from(row)} |")
    return "\n".join(lines) + "\n"


def _fast_decode_from(row: dict) -> str:
    """When the compiled decode kernels took over (seconds from the start), or why they did not."""
    state = row.get("fast_decode")
    if state is None:
        return "-"
    return f"{row['fast_decode_ready_s']:.1f} s" if state == "ready" else state


def _llama_md(r: dict) -> str:
    row = r.get("llama_cpp", {})
    if not row.get("available"):
        return f"## llama.cpp peer\n\nNot run: {row.get('reason', 'unknown')}.\n"
    a = row["seeds_way"]
    return ("## llama.cpp peer\n\n| path | p50 ms | p95 ms | msg/s | accuracy | decode tok/s |\n|---|---|---|---|---|---|\n"
            f"| {row['gguf']}, seeds' way | {_n(a['p50_ms'], 0)} | {_n(a['p95_ms'], 0)} | {_n(a['per_s'], 2)} | "
            f"{100 * a['accuracy']:.1f} % | {_n(row['decode_tokens_per_s'], 2)} |\n")


def _n(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e9:.2f} GB"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


# -- Plot -------------------------------------------------------------------------------------------

def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a board or in CI
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    boxes, names, rates = [], [], {}
    for variant, v in r.get("variants", {}).items():
        s = v.get("sentiment")
        if not s:
            continue
        for key, label in PATHS:
            if s[key].get("samples_ms"):
                boxes.append(s[key]["samples_ms"])
                names.append(f"{label[:3]}\n{variant}")  # "(a)\nfp32"
        rates[variant] = [s[key]["per_s"] or 0 for key, _ in PATHS]
    if boxes:
        left.boxplot(boxes, showfliers=True)
        left.set_xticks(range(1, len(names) + 1), names, fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("latency per message, ms (log)")
    left.set_title("sentiment latency: (a) seeds' way, (b) one message,\n(c) burst incl. queueing")
    width = 0.8 / max(1, len(rates))
    for i, (variant, values) in enumerate(rates.items()):
        right.bar([x + i * width for x in range(len(PATHS))], values, width, label=variant)
    right.set_xticks([x + width * (len(rates) - 1) / 2 for x in range(len(PATHS))],
                     ["(a) seeds' way", "(b) one message", "(c) burst, batched"])
    right.set_yscale("log")
    right.set_ylabel("messages / s (log)")
    right.set_title("sentiment throughput")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
