"""`llmqtt bench` end to end in a mini mode on the tiny random model: well-formed JSON and Markdown.

No timing assertions: the numbers of a random 2-layer model on a shared machine mean nothing; what is
checked is that every section runs and lands in the report. The real figures live in docs/bench/.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from llmqtt.bench.seeds import parse_label

LABELS = {"positive": ["positive"], "negative": ["negative"]}


@pytest.mark.parametrize("answer, expected", [
    ("positive", "positive"),
    (" Negative.", "negative"),
    ("The sentiment is positive", "positive"),
    ("negative, not positive", "negative"),  # the first label word said wins
    ("nonnegative", None),  # whole words only
    ("I cannot tell", None),
    ("", None),
])
def test_parse_label(answer, expected):
    assert parse_label(answer, LABELS) == expected


def test_parse_label_several_words_and_chinese():
    labels = {"positive": ["positive", "正面"], "negative": ["negative", "负面"]}
    assert parse_label("这条评论是负面的", labels) == "negative"
    assert parse_label("正面", labels) == "positive"


def test_data_sample_is_split_disjoint(repo_root):
    from llmqtt.bench.data import load_rows

    for lang in ("en", "zh"):
        path = repo_root / "bench" / "data" / f"sentiment-{lang}.jsonl"
        dev, test = load_rows(path, "dev"), load_rows(path, "test")
        assert len(test) >= 500 and dev
        assert not {r.id for r in dev} & {r.id for r in test}
        assert {r.label for r in test} == {"positive", "negative"}


@pytest.fixture(scope="module")
def mini_result(tiny_model_dir, repo_root, tmp_path_factory):
    """The bench on the tiny model, with a sentiment head fitted for it by `llmqtt fit` on 40 dev rows."""
    import shutil

    from llmqtt import cli
    from llmqtt.bench import runner
    from llmqtt.config import Config

    prompts = tmp_path_factory.mktemp("prompts")
    for path in (repo_root / "prompts").glob("*.yaml"):
        shutil.copy(path, prompts)
    dev = [line for lang in ("en", "zh") for line in
           (repo_root / "bench" / "data" / f"sentiment-{lang}.jsonl").read_text(encoding="utf-8").split("\n")[:20]]
    data = prompts.parent / "fit.jsonl"
    data.write_text("\n".join(dev) + "\n", encoding="utf-8")
    settings = {"model": {"name": str(tiny_model_dir), "auto_fetch": False}, "prompts": [str(prompts)]}
    config_file = prompts.parent / "config.json"
    # The head is fitted under float32, the scheme the bench's accuracy section serves it with (a head is
    # served only under the scheme it was fitted under).
    fit_settings = {**settings, "model": {**settings["model"], "quantize": "none"}}
    config_file.write_text(json.dumps(fit_settings), encoding="utf-8")
    assert cli.main(["fit", "sentiment", str(data), "--config", str(config_file)]) == 0
    return runner.run(Config.model_validate(settings), runner.MINI, show_progress=False)


# Every section, six start-up subprocesses and a `llmqtt fit`: past pytest's 600 s on a loaded 2-core machine.
@pytest.mark.timeout(1500)
def test_mini_bench_covers_every_section(mini_result):
    from llmqtt.bench.runner import MINI

    r = mini_result
    assert r["meta"]["mode"] == "mini" and r["meta"]["torch"]
    sentiment = r["accuracy"]["sentiment"]
    assert sentiment["served"] == "head" and sentiment["head"]["rows"] == 40
    for lang in ("en", "zh"):
        for read_out in ("prompt", "head", "tfidf"):
            s = sentiment["by_language"][lang][read_out]
            assert s["n"] == 4 and 0.0 <= s["accuracy"] <= 1.0
            assert sum(sum(row.values()) for row in s["confusion"].values()) == 4
        assert sentiment["by_language"][lang]["tfidf"]["train_rows"] == MINI.baseline_rows
    assert sentiment["latency"]["head"]["n"] == sentiment["latency"]["prompt"]["n"] == 3 * 4
    assert r["accuracy"]["emotion"] == {"skipped": "no labelled data"}
    assert r["accuracy_default"]["sentiment"]["en"]["n"] == 4
    for variant, rows in (("fp32", 4), ("default", 2), ("bf16", 2)):  # MINI: 2 and 1 rows per language
        v = r["variants"][variant]
        s = v["sentiment"]
        assert s["seeds_way"]["n"] == s["classify_one"]["n"] == rows
        assert s["burst"]["n"] == 8 and s["burst"]["errors"] == 0
        assert s["b_over_a"] > 0 and s["c_over_a"] > 0
        assert v["chat"]["prefix_tokens"] > 0 and v["chat"]["first_token_speedup"] > 0
        # also at the chat task's own sampling (temperature > 0), as its requests run by default
        assert v["chat"]["decode_sampled_tokens_per_s"] > 0 and len(v["chat"]["decode_sampled_new_tokens"]) >= 3
        assert v["bound"]["tokens_per_s"] > 0
    c = r["variants"]["fp32"]["conversation"]  # turn 2: reuse runs fewer tokens, HA's new time stamp more
    assert c["reps"] >= 3 and c["same_system"]["tokens_run"] < c["new_time"]["tokens_run"] <= c["off"]["tokens_run"]
    assert c["speedup_same_system"] > 0 and len(c["off"]["runs_ms"]) == c["reps"]
    assert c["new_time_tolerant"]["tokens_run"] < c["new_time"]["tokens_run"]  # past the changed time stamp
    assert r["variants"]["default"]["dtype"] == "float32+int8"  # quantize: auto on this x86 machine
    assert r["variants"]["default"]["weight_bytes"] < r["variants"]["fp32"]["weight_bytes"]
    # Measured with what a daemon serves with: fp32's one-row kernels, the default's compiled decode step.
    assert r["variants"]["fp32"]["fast_decode"]["state"] == "ready"
    assert r["variants"]["default"]["fast_decode"]["state"] == "ready"
    assert r["startup"]["ready_fp32"]["fast_decode"] == "ready" and r["startup"]["ready_default"]["fast_decode"] == "ready"
    # The first start compiles the decode step and keeps it; the restart loads it (no trace after READY).
    assert not r["startup"]["first_start_default"]["fast_decode_from_disk"]
    assert r["startup"]["ready_default"]["fast_decode_from_disk"]
    # The first start quantizes and stores; the restart reads the stored weights.
    assert not r["startup"]["first_start_default"]["from_store"] and r["startup"]["ready_default"]["from_store"]
    assert r["startup"]["ready_default"]["at_rest_bytes"] > 0
    for key in ("bare", "bare_forward", "first_start_fp32", "ready_fp32", "first_start_default", "ready_default"):
        assert "error" not in r["startup"][key], r["startup"][key]
        assert r["startup"][key]["peak_rss_bytes"] > r["startup"][key]["rss_after_imports_bytes"] > 0
    for key in ("bare", "bare_forward"):  # transformers' model code imported inside the clock, timed apart
        row = r["startup"][key]
        assert 0 < row["model_code_s"] < row["seconds"] and row["rss_after_model_code_bytes"] > row["rss_after_imports_bytes"]
    assert 0 < r["startup"]["ready_default"]["tokenizer_alone_s"] < r["startup"]["ready_default"]["seconds"]
    for name in ("fp32", "default"):  # the first start computes every prefix, the restart reads every one
        first, restart = r["startup"][f"first_start_{name}"], r["startup"][f"ready_{name}"]
        assert (first["prefixes_from_disk"], restart["prefixes_from_disk"]) == (0, restart["tasks"]) and first["tasks"] > 1
    assert r["llama_cpp"]["available"] in (True, False)
    check_mixed(r["mixed"], MINI)


def check_mixed(m: dict, sizes) -> None:
    """The mixed-load section: every run measured, sentiments answered while the chats streamed."""
    assert len(m["runs"]) == sizes.chat_reps and m["sentiments"] == sizes.mixed_sentiments
    for run in m["runs"]:
        assert run["sentiment_idle"]["n"] == run["sentiment_busy"]["n"] == sizes.mixed_sentiments
        assert len(run["four"]["first_token_ms"]) == 4 and run["four"]["tokens_per_s"] > 0
    assert m["chat_steps_while_busy"] > 0  # the chats kept streaming between the sentiments
    for key in ("sentiment_p95_busy_over_idle", "four_over_one_tokens_per_s", "first_token_slowest_of_four_over_one",
                "one_over_direct_tokens_per_s", "one_over_direct_first_token", "idle_over_direct_sentiment_p50"):
        assert m[key] > 0


def _only(runner, tiny_model_dir, tmp_path, repo_root, section: str) -> dict:
    """`llmqtt bench --only SECTION` in the mini mode on the tiny model, with the shipped sentiment and chat."""
    from llmqtt.config import Config

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("sentiment.yaml", "chat.yaml"):
        (prompts / name).write_text((repo_root / "prompts" / name).read_text(encoding="utf-8"), encoding="utf-8")
    settings = {"model": {"name": str(tiny_model_dir), "auto_fetch": False}, "prompts": [str(prompts)]}
    return runner.run(Config.model_validate(settings), runner.MINI, show_progress=False, only=section)


@pytest.mark.timeout(900)
def test_only_mixed_runs_the_default_engine_and_the_mixed_section(tiny_model_dir, tmp_path, repo_root):
    from llmqtt.bench import report, runner, targets

    r = _only(runner, tiny_model_dir, tmp_path, repo_root, "mixed")
    assert list(r["variants"]) == ["default"] and "accuracy" not in r and "startup" not in r
    check_mixed(r["mixed"], runner.MINI)
    mixed = [t for t in targets.targets(r) if t["target"].startswith("mixed:")]
    assert len(mixed) == 6 and all(t["met"] in (True, False) for t in mixed)
    for t in mixed:  # a missed one says why, in this run's numbers
        assert t["met"] or any(ch.isdigit() for ch in t["why"])
    paths = report.write(r, tmp_path / "out")
    assert "## Mixed load" in paths["markdown"].read_text(encoding="utf-8")


@pytest.mark.timeout(900)
def test_only_served_measures_what_compare_needs_of_a_second_model(tiny_model_dir, tmp_path, repo_root):
    """`llmqtt bench --only served`: the default config's engine alone: served accuracy, speed, peak RSS."""
    from llmqtt.bench import report, runner
    from llmqtt.bench.compare import compare_markdown

    r = _only(runner, tiny_model_dir, tmp_path, repo_root, "served")
    assert list(r["variants"]) == ["default"] and "accuracy" not in r and "mixed" not in r and "startup" not in r
    per_lang = r["accuracy_default"]["sentiment"]
    assert {lang: s["n"] for lang, s in per_lang.items()} == {"en": runner.MINI.accuracy_rows,
                                                              "zh": runner.MINI.accuracy_rows}
    default = r["variants"]["default"]
    assert default["process_peak_rss_bytes"] > default["weight_bytes"] > 0
    text = compare_markdown([r])
    assert f"| peak RSS of a process serving it (default, --only served) | " \
           f"{default['process_peak_rss_bytes'] / 1e9:.2f} GB |" in text
    assert "| sentiment accuracy en (fp32, test split) | - |" in text  # not run: a dash
    assert "default" in report.write(r, tmp_path / "out")["markdown"].read_text(encoding="utf-8")


@pytest.mark.timeout(1500)
def test_mini_bench_writes_json_markdown_and_plot(mini_result, tmp_path):
    from llmqtt.bench import report, targets

    paths = report.write(mini_result, tmp_path)
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert len(data["targets"]) == len(targets.TARGETS)
    # Every target was measured, but those against llama.cpp: the tiny model has no GGUF.
    assert all(t["met"] in (True, False) for t in data["targets"] if "llama.cpp" not in t["target"])
    missed = [t for t in data["targets"] if t["met"] is False]
    assert missed and all(t["why"] for t in missed), missed  # the random model misses some: each says why
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "{m[" not in md and "Machine: " in md  # every placeholder filled in
    for heading in ("## Targets", "## Accuracy", "## Sentiment speed", "## Chat speed", "## Start-up and memory",
                    "## llama.cpp peer", "bench.png"):
        assert heading in md
    assert "None" not in md  # no unformatted values
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_has_bench_command():
    from llmqtt.cli import _parser

    args = _parser().parse_args(["bench", "--quick", "--out", "x"])
    assert args.quick and str(args.out) == "x"


def test_refused_text_counts_as_no_label_and_wrong():
    from llmqtt.bench.accuracy import classify_rows
    from llmqtt.bench.data import Row
    from llmqtt.engine.types import Classification, TextTooLong

    class LongTextRefusingEngine:
        tasks = {"s": type("Task", (), {"labels": {"positive": ["positive"], "negative": ["negative"]}})()}

        def classify(self, task, texts, use_head=True):
            if any(len(t) > 10 for t in texts):
                raise TextTooLong("too long")
            return [Classification("positive", 0.9, {"positive": 0.9, "negative": 0.1}) for _ in texts]

    rows = [Row("1", "short", "positive", "test"), Row("2", "x" * 20, "positive", "test"),
            Row("3", "ok", "negative", "test")]
    summary = classify_rows(LongTextRefusingEngine(), "s", rows).summary()
    assert summary["n"] == 3 and summary["no_label"] == 1
    assert summary["confusion"]["positive"] == {"positive": 1, "negative": 0, "none": 1}
    assert summary["accuracy"] == 1 / 3


def test_a_missed_target_is_explained_with_this_runs_numbers():
    from llmqtt.bench.targets import targets

    confusion = {"positive": {"positive": 40, "negative": 3, "none": 0},
                 "negative": {"positive": 7, "negative": 50, "none": 0}}
    burst = {"per_s": 30.0, "padded_tokens": 1200, "text_tokens": 900, "forward_calls": 4}
    prompt = {"n": 100, "accuracy": 0.90, "no_label": 0, "confusion": confusion}
    result = {"accuracy": {"sentiment": {"served": "prompt", "head": None,
                                         "by_language": {"en": {"prompt": prompt, "tfidf": {"skipped": "no rows"}}}}},
              "variants": {"fp32": {"sentiment": {"b_over_a": 6.0, "c_over_a": 7.5, "burst": burst,
                                                  "classify_one": {"per_s": 24.0, "accuracy": 0.9},
                                                  "seeds_way": {"per_s": 4.0, "accuracy": 0.8}}}}}
    by_name = {t["target"]: t for t in targets(result)}
    english = by_name["sentiment accuracy, English"]
    assert english["met"] is False
    assert "10 of 100 wrong; most often negative read as positive (7 of the 10)" in english["why"]
    assert "seeds' way scored 80.0 %" in english["why"] and "prompt 90.0 %" in english["why"]
    burst_target = by_name["burst of 64 vs seeds' throughput (c/a)"]
    assert burst_target["met"] is False and "1.25x" in burst_target["why"] and "25 % padding" in burst_target["why"]
    assert by_name["sentiment accuracy, Chinese"]["met"] is None  # not measured: no reason, no crash


def test_the_peak_memory_reason_names_its_parts_and_the_floor_they_set():
    """Computed from the run: the runtime, the weights and the KV cache alone already exceed 1.3x the at-rest
    weights + KV cache, and how the decode step came (loaded, not compiled) is what the row says."""
    from llmqtt.bench.targets import targets

    ready = {"rss_after_imports_bytes": 0.27e9, "peak_rss_bytes": 1.15e9, "peak_rss_ready_bytes": 1.10e9,
             "weight_bytes": 0.50e9, "at_rest_bytes": 0.63e9, "kv_cache_bytes": 0.05e9, "fast_decode_from_disk": True}
    target = {t["target"]: t for t in targets({"startup": {"ready_default": ready}})}[
        "default peak RSS / (quantized weights at rest + KV cache)"]
    assert target["met"] is False
    assert "alone are 1.21x" in target["why"] and "was loaded (kept by the first start) (+0.05 GB)" in target["why"]


def test_the_sampling_target_says_what_a_sampled_token_costs_more():
    from llmqtt.bench.targets import targets

    chat = {"decode_tokens_per_s": 40.0, "decode_sampled_tokens_per_s": 20.0}
    target = {t["target"]: t for t in targets({"variants": {"default": {"chat": chat}}})}[
        "default decode at the chat task's sampling / greedy"]
    assert target["met"] is False and "costs 25.0 ms more a token" in target["why"]


def test_the_memory_floor_counts_the_model_code_a_bare_load_imports_too():
    from llmqtt.bench.targets import targets

    ready = {"rss_after_imports_bytes": 0.27e9, "peak_rss_bytes": 1.15e9, "weight_bytes": 0.50e9,
             "at_rest_bytes": 0.63e9, "kv_cache_bytes": 0.05e9}
    bare = {"rss_after_model_code_bytes": 0.43e9}
    target = {t["target"]: t for t in targets({"startup": {"ready_default": ready, "bare": bare}})}[
        "default peak RSS / (quantized weights at rest + KV cache)"]
    assert "transformers and its model code) is 0.43 GB" in target["why"] and "alone are 1.44x" in target["why"]


def test_the_restart_reason_sets_the_tokenizer_against_the_bare_load():
    """Both starts import transformers' model code (Python); the tokenizer is Python too, so it cannot
    overlap that import: the import plus the tokenizer alone is the restart's floor, computed from the run."""
    from llmqtt.bench.targets import targets

    ready = {"seconds": 3.4, "load_s": 3.2, "prefix_s": 0.1, "warmup_s": 0.1, "tokenizer_s": 1.0,
             "tokenizer_alone_s": 0.56}
    bare = {"seconds": 2.8, "model_code_s": 2.5}
    target = {t["target"]: t for t in targets({"startup": {"ready_default": ready, "bare": bare}})}[
        "default restart ready / bare fp32 from_pretrained"]
    assert target["met"] is False
    assert "2.5 s of the bare load is importing" in target["why"] and "alone make 1.09x" in target["why"]


def test_fit_file_holds_dev_rows_only(repo_root, tmp_path):
    from llmqtt.bench.data import FIT_FILE, FIT_ROWS, load_fit_rows, load_rows

    data = repo_root / "bench" / "data"
    tests = [data / f"sentiment-{lang}.jsonl" for lang in ("en", "zh")]
    fit = load_fit_rows(data / FIT_FILE, tests)  # raises if any row is a test row
    assert {lang: sum(r.lang == lang for r in fit.rows) for lang in FIT_ROWS} == FIT_ROWS
    leaked = tmp_path / "fit.jsonl"
    test_row = load_rows(tests[0], "test")[0]
    leaked.write_text(json.dumps({**test_row.__dict__, "split": "dev", "lang": "en"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="test split"):
        load_fit_rows(leaked, tests)


def test_compare_puts_two_models_side_by_side(tmp_path, repo_root):
    """`llmqtt bench --compare`: the shipped 0.5B result beside a 1.5B result from another mode and machine."""
    import copy
    import subprocess
    import sys

    from llmqtt.bench.compare import compare_markdown

    small = json.loads((repo_root / "docs" / "bench" / "result.json").read_text())
    large = copy.deepcopy(small)
    large["meta"] |= {"model": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)", "mode": "quick", "cores": 4}
    sentiment = large["accuracy"]["sentiment"]  # by language, then by path (prompt/head/tfidf) since #16's rows
    served = sentiment["by_language"]["en"][sentiment["served"]] if "by_language" in sentiment else sentiment["en"]
    served |= {"accuracy": 0.93, "n": 100}
    del large["startup"]
    text = compare_markdown([small, large])
    header = next(line for line in text.splitlines() if line.startswith("| |"))
    assert "0.5B" in header and "1.5B" in header
    shipped = small["accuracy"]["sentiment"]
    shipped = shipped["by_language"]["en"][shipped["served"]] if "by_language" in shipped else shipped["en"]
    assert (f"| sentiment accuracy en (fp32, test split) | {100 * shipped['accuracy']:.1f} % of {shipped['n']} |"
            " 93.0 % of 100 |") in text
    peak = small["startup"]["ready_fp32"]["peak_rss_bytes"] / 1e9
    assert f"| peak RSS, ready (fp32) | {peak:.2f} GB | - |" in text  # not measured in one run: a dash, not a crash
    assert "different machines" in text and "different sample sizes" in text
    (tmp_path / "a.json").write_text(json.dumps(small))
    (tmp_path / "b.json").write_text(json.dumps(large))
    done = subprocess.run([sys.executable, "-m", "llmqtt", "bench", "--compare", str(tmp_path / "a.json"),
                           str(tmp_path / "b.json"), "--out", str(tmp_path / "cmp")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cmp" / "compare.md").read_text() == done.stdout.rstrip("\n") + "\n"


def test_compare_shows_what_the_default_config_serves(repo_root):
    """Beside fp32: the default config's accuracy, speed and memory (quantize: auto), from the same run."""
    from llmqtt.bench.compare import compare_markdown

    quick = json.loads((repo_root / "docs" / "bench" / "quick" / "result.json").read_text())
    text = compare_markdown([quick])
    default, ready = quick["variants"]["default"], quick["startup"]["ready_default"]
    zh = quick["accuracy_default"]["sentiment"]["zh"]
    assert f"| sentiment accuracy zh (default config) | {100 * zh['accuracy']:.1f} % of {zh['n']} |" in text
    assert f"| default config's weights | {default['dtype']} |" in text
    assert f"| chat decode (default) | {default['chat']['decode_tokens_per_s']:.1f} tok/s |" in text
    assert f"| weights at rest in the cache (default) | {ready['at_rest_bytes'] / 1e9:.2f} GB |" in text
    assert f"| peak RSS, ready (default) | {ready['peak_rss_bytes'] / 1e9:.2f} GB |" in text
    assert f"| sentiment read-out served | {quick['accuracy']['sentiment']['served']} |" in text


def test_rows_limits_the_accuracy_sample(monkeypatch):
    """`llmqtt bench --rows N`: the first N test rows per language, every other size as the mode has it."""
    from llmqtt import bench
    from llmqtt.bench import report, runner, targets

    seen = {}

    def run(config, sizes, only=None):
        seen["sizes"] = sizes
        return {}

    monkeypatch.setattr(runner, "run", run)
    monkeypatch.setattr(report, "write", lambda result, out: {"markdown": "m", "json": "j", "plot": "p"})
    monkeypatch.setattr(targets, "targets", lambda result: [])
    bench.main(None, quick=True, rows=20)
    assert seen["sizes"] == replace(runner.QUICK, accuracy_rows=20)
