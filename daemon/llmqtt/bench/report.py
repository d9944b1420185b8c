"""result dict -> result.json, report.md and bench.png. What the targets are and why one was missed:
targets.py; the plot: plot.py. This module only writes."""

from __future__ import annotations

import json
from pathlib import Path

from .plot import PATHS, plot
from .targets import div, fmt_target, get, shortfall, targets

PLOT = "bench.png"


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
    weights = (f"fp32 (reference, `model.quantize: none`) and default (an unchanged config: `model.quantize: auto`, "
               f"{_default_dtype(r)}){' and bf16' if 'bf16' in r.get('variants', {}) else ''}")
    if m.get("only"):
        weights = (f"`--only {m['only']}`: that section alone, on the default config's engine (`model.quantize: auto`, "
                   f"{_default_dtype(r)}); the other targets were not measured in this run")
    parts = [f"# llmqtt bench ({m['mode']}{', only ' + m['only'] if m.get('only') else ''})\n",
             f"Model **{m['model']}**: {weights}. "
             f"Speed figures are medians of at least 3 runs. Machine: {m['cpu']}, {m['cores']} cores "
             f"(torch threads {m['torch_threads']}), {_gb(m['ram_bytes'])} RAM; Python {m['python']}, torch "
             f"{m['torch']}, transformers {m['transformers']}; {m['date']}; run took {m.get('elapsed_s', 0) / 60:.1f} min.\n",
             "All ratios are from this one run on this machine; absolute numbers move with machine load.\n",
             _targets_md(r), *([_accuracy_md(r) if "accuracy_default" in r else "", _sentiment_md(r), _chat_md(r), _mixed_md(r)]
                               if m.get("only") else
                               [_accuracy_md(r), _sentiment_md(r), _chat_md(r), _mixed_md(r), _conversation_md(r),
                                _startup_md(r), _llama_md(r)]),
             f"![latency and throughput]({PLOT})\n"]
    return "\n".join(p for p in parts if p)


def _default_dtype(r: dict) -> str:
    return get(r, "variants", "default", "dtype") or "not run"


def _targets_md(r: dict) -> str:
    lines = ["## Targets\n", "| target | goal | this run | met | why, where missed |", "|---|---|---|---|---|"]
    for t in r["targets"]:
        if r["meta"].get("only") and t["value"] is None:
            continue  # a section this run left out
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else f"**no** ({shortfall(t)})")
        value = fmt_target(t)
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {met} | {t['why']} |")
    return "\n".join(lines) + "\n"


def _accuracy_md(r: dict) -> str:
    d = r["meta"]["data"]
    lines = ["## Accuracy\n", f"Test split of the seeded sample in `{d['dir']}` (seed {d['seed']}; {d['split']}). "
             "Prompts were tuned, heads and the TF-IDF baseline fitted, on dev rows only. fp32.\n"]
    for task, section in r.get("accuracy", {}).items():
        if "skipped" in section:
            lines.append(f"- `{task}`: {section['skipped']}\n")
            continue
        head = section.get("head")
        lines.append(f"**{task}** (the daemon serves its {section['served']})" + (
            f": head on {head['features']}, {head['rows']} rows, cross-validated {100 * head['cv_accuracy']:.1f} %, "
            f"fitted under {head.get('scheme')}; baseline trained on the head's rows: "
            f"{'yes' if head['baseline_same_rows'] else 'no'}\n" if head else "\n"))
        lines += ["| language | prompt (label logits) | learned head | TF-IDF + logistic regression |", "|---|---|---|---|"]
        for lang, per in section["by_language"].items():
            cells = [_acc_cell(per.get(k)) for k in ("prompt", "head", "tfidf")]
            lines.append(f"| {lang} | " + " | ".join(cells) + " |")
        lines.append("")
        if "latency" in section:
            lat = section["latency"]
            lines.append(f"Per-message latency, one at a time, interleaved: head p50 {lat['head']['p50_ms']:.0f} ms, "
                         f"prompt p50 {lat['prompt']['p50_ms']:.0f} ms ({lat['p50_head_over_prompt']:.2f}x; per pass: "
                         + ", ".join(f"{x:.2f}x" for x in lat["p50_ratio_per_rep"]) + ")\n")
        for lang, per in section["by_language"].items():
            s = per.get(section["served"])
            refused = f" ({s['no_label']} refused as too long, counted wrong)" if s["no_label"] else ""
            lines.append(f"{task} / {lang}, {section['served']}: {100 * s['accuracy']:.1f} % of {s['n']}{refused}\n")
            lines.append(_confusion_md(s["confusion"]))
    for task, per_lang in r.get("accuracy_default", {}).items():  # the default config, as the daemon serves
        for lang, s in per_lang.items():
            served = f", {s['served']}" if s.get("served") else ""
            lines.append(f"{task} / {lang}, default ({_default_dtype(r)}{served}): {100 * s['accuracy']:.1f} % of {s['n']}\n")
    return "\n".join(lines) + "\n"


def _acc_cell(summary: dict | None) -> str:
    if summary is None:
        return "-"
    if "skipped" in summary:
        return f"n/a ({summary['skipped']})"
    return f"{100 * summary['accuracy']:.1f} % of {summary['n']}"


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
            if key not in s:  # `--only`: (b) alone
                continue
            p = s[key]
            acc = f"{100 * p['accuracy']:.1f} %" if "accuracy" in p else "-"
            lines.append(f"| {name} | {label} | {p['n']} | {_n(p['p50_ms'], 0)} | {_n(p['p95_ms'], 0)} | "
                         f"{_n(p['per_s'], 2)} | {acc} |")
        if "burst" not in s:
            continue
        ratios.append(f"- {name}: b/a = **{_n(s['b_over_a'], 1)}x** throughput (p50 latency a/b {_n(s['p50_a_over_b'], 1)}x), "
                      f"c/a = **{_n(s['c_over_a'], 1)}x** (burst batch {s['burst']['batch']}, errors {s['burst']['errors']})")
    return "\n".join(lines + [""] + ratios) + "\n"


def _chat_md(r: dict) -> str:
    bw = r.get("bandwidth_bytes_per_s")
    lines = ["## Chat speed\n", f"Memory bandwidth measured in this run (median of 5 sums of a "
             f"{_gb(r['meta']['sizes']['bandwidth_bytes'])} tensor): "
             f"**{_n(bw and bw / 1e9, 1)} GB/s**; one fp32 matrix-vector product (F.linear, 1 row) over a matrix of the "
             f"same size: **{_n(r.get('gemv_bytes_per_s') and r['gemv_bytes_per_s'] / 1e9, 1)} GB/s**. "
             "Bound = bandwidth / weight bytes read per token. Decode: `compiled` = `model.fast_decode` (fp32: "
             "one-row products through a compiled multiply-and-sum, engine/fastdecode.py; quantized: the whole step "
             "over a static KV cache, engine/decode.py), `torch` = eager. Decode tok/s and first token: medians. "
             "Decode is greedy; `sampled` decodes at the chat task's own temperature and top_p, as its requests do by "
             "default (a fixed seed).\n",
             "| weights | decode kernels | prefix tok | user tok | first token cached ms | recomputed ms | speed-up | "
             "decode tok/s | sampled tok/s | bound tok/s | of bound |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in r.get("variants", {}).items():
        c, b = v.get("chat"), v.get("bound", {})
        if not c:
            continue
        fast = v.get("fast_decode", {})
        state, wrapper = fast.get("state"), fast.get("wrapper")
        if state == "ready":
            kernels = f"compiled ({wrapper})" if wrapper else "compiled"
        else:
            kernels = f"torch ({state})" if state else "torch"
        if fast.get("int8"):
            kernels += f"; int8 on {fast['int8']}"
        lines.append(f"| {name} | {kernels} | {c['prefix_tokens']} | {c['rest_tokens']} | {_n(c['first_token_cached_ms'], 0)} | "
                     f"{_n(c['first_token_recomputed_ms'], 0)} | {_n(c['first_token_speedup'], 2)}x | "
                     f"{_n(c['decode_tokens_per_s'], 2)} | {_n(c.get('decode_sampled_tokens_per_s'), 2)} | "
                     f"{_n(b.get('tokens_per_s'), 2)} | "
                     f"{_n(c.get('decode_pct_of_bound'), 0)} % |")
    return "\n".join(lines) + "\n"


def _mixed_md(r: dict) -> str:
    m = r.get("mixed")
    if not m or "skipped" in m:
        return ""
    return "\n".join([
        "## Mixed load (the service's step loop, default weights)\n",
        f"Through `service.Service` as the daemon runs it; medians of {len(m['runs'])} runs. Sentiment: "
        f"{m['sentiments']} messages one after another, idle and while 2 long chats stream. Chats: greedy, each its "
        "own question; tokens/s = tokens after the first / seconds from the first chunk to the last answer.\n",
        "| | straight from the engine | service, idle | service, while 2 chats stream |", "|---|---|---|---|",
        f"| sentiment p50 ms | {_n(m['direct_sentiment_p50_ms'], 0)} | {_n(m['sentiment_idle_p50_ms'], 0)} | "
        f"{_n(m['sentiment_busy_p50_ms'], 0)} |",
        f"| sentiment p95 ms | | {_n(m['sentiment_idle_p95_ms'], 0)} | {_n(m['sentiment_busy_p95_ms'], 0)} |",
        f"\nThe 2 chats made {_n(m['chat_steps_while_busy'], 0)} decode steps (a token each) while the sentiments ran.\n",
        "| chats at once | tokens/s (all) | ms a step | first token ms |", "|---|---|---|---|",
        f"| 1, straight from the engine | {_n(m['direct_tokens_per_s'], 2)} | | {_n(m['direct_first_token_ms'], 0)} |",
        f"| 1 | {_n(m['one_tokens_per_s'], 2)} | {_n(m['one_step_ms'], 0)} | {_n(m['one_first_token_ms'], 0)} |",
        f"| 4 | {_n(m['four_tokens_per_s'], 2)} | {_n(m['four_step_ms'], 0)} | "
        f"{', '.join(_n(v, 0) for v in m['four_first_token_ms'])} |",
    ]) + "\n"


def _conversation_md(r: dict) -> str:
    lines = ["## Conversation turn 2 (HTTP clients resend the history)\n",
             "First token of turn 2 (median of the runs; each after a fresh turn 1, greedy, up to 32 answer tokens): the "
             "conversation cache off; on with the same system prompt (ollama/openai clients, the web page); on with "
             "the system prompt's time stamp moved on, as Home Assistant renders it each turn (exact reuse stops "
             "there), and that in the opt-in tolerant mode (`model.conversation_cache_mode: tolerant`: the changed "
             "time stamp is recomputed, the rest reused). `tok run` = prompt tokens computed for turn 2.\n",
             "| weights | prompt tok | off ms (tok run) | same system ms (tok run) | speed-up | new time ms (tok run) | "
             "speed-up | new time, tolerant ms (tok run) | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in r.get("variants", {}).items():
        c = v.get("conversation")
        if not c:
            continue
        lines.append(f"| {name} | {c['prompt_tokens']} | {_n(c['off']['first_token_ms'], 0)} ({c['off']['tokens_run']}) | "
                     f"{_n(c['same_system']['first_token_ms'], 0)} ({c['same_system']['tokens_run']}) | "
                     f"{_x(c['speedup_same_system'])} | {_n(c['new_time']['first_token_ms'], 0)} "
                     f"({c['new_time']['tokens_run']}) | {_x(c['speedup_new_time'])} | "
                     f"{_n(c['new_time_tolerant']['first_token_ms'], 0)} ({c['new_time_tolerant']['tokens_run']}) | "
                     f"{_x(c['speedup_new_time_tolerant'])} |")
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
             "`fast decode from`: when the compiled decode kernels (built in the background after ready, or loaded: "
             "\"kept step loaded\", the step a first start compiled and kept) took over; peak RSS includes them. "
             "`anonymous` is the RSS once ready that is the process's own memory; the rest are clean pages of the "
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
                     f"{_x(div(row.get('rss_anon_bytes'), row['weight_bytes']))} | "
                     f"{_fast_decode_from(row)} |")
    return "\n".join(lines) + "\n"


def _fast_decode_from(row: dict) -> str:
    """When the compiled decode kernels took over (seconds from the start), or why they did not."""
    state = row.get("fast_decode")
    if state is None:
        return "-"
    if state != "ready":
        return state
    return f"{row['fast_decode_ready_s']:.1f} s" + (" (kept step loaded)" if row.get("fast_decode_from_disk") else "")


def _llama_md(r: dict) -> str:
    row = r.get("llama_cpp", {})
    if not row.get("available"):
        return f"## llama.cpp peer\n\nNot run: {row.get('reason', 'unknown')}.\n"
    v, startup = r.get("variants", {}).get("default", {}), r.get("startup", {}).get("ready_default", {})
    c, s, ls = v.get("chat", {}), v.get("sentiment", {}).get("classify_one", {}), row["sentiment"]
    lines = ["## llama.cpp peer\n",
             f"llama-cpp-python on `{row['gguf']}` ({_gb(row['gguf_bytes'])}), {row['threads']} threads, in its own "
             "process, fed the same token ids as llmqtt. Sentiment: the few-shot prefix evaluated once, `n_tokens` "
             "reset to its length per message, label logits read with `llama_get_logits_ith`. First token: after the "
             "chat system prompt evaluated once. Medians of at least 3 runs (sentiment: of every message).\n",
             "| engine | sentiment p50 ms | sentiment accuracy (same rows) | first token ms | prompt tok/s | "
             "decode tok/s | peak RSS | load s |", "|---|---|---|---|---|---|---|---|",
             f"| llmqtt default ({_default_dtype(r)}) | {_n(s.get('p50_ms'), 0)} | {_pct(s.get('accuracy'))} | "
             f"{_n(c.get('first_token_cached_ms'), 0)} | - | {_n(c.get('decode_tokens_per_s'), 1)} | "
             f"{_gb(startup.get('peak_rss_bytes'))} | {_n(startup.get('load_s'), 1)} |",
             f"| llama.cpp | {_n(ls['p50_ms'], 0)} | {_pct(ls.get('accuracy'))} | {_n(row['first_token_cached_ms'], 0)} | "
             f"{_n(row['prompt_tokens_per_s'], 0)} | {_n(row['decode_tokens_per_s'], 1)} | {_gb(row['peak_rss_bytes'])} | "
             f"{_n(row['load_s'], 1)} |"]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _n(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e9:.2f} GB"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"
