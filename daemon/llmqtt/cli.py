"""`llmqtt` command line: a thin layer that parses arguments and calls one module per subcommand."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, file_problems, load_config
from .tasks import TaskFileError, load_tasks, task_files


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(main(argv))


def main(argv: list[str] | None = None, *, engine_factory=None) -> int:
    """`engine_factory` replaces `llmqtt.engine.load_engine` for `run` and `ask` (tests pass a fake)."""
    args = _parser().parse_args(argv)
    args.engine_factory = engine_factory
    try:
        return args.func(args)
    except (ConfigError, TaskFileError) as exc:
        print(f"llmqtt: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmqtt", description="Serve one small LLM to prompt-defined text tasks over MQTT.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", "-c", type=Path, help="config file (YAML); default: built-in defaults")
        p.set_defaults(func=func)
        return p

    command("run", _run, "run the MQTT daemon")
    ask = command("ask", _ask, "run one request through a task and print the JSON result")
    ask.add_argument("task", help="a task name from the prompt files (see `llmqtt tasks`)")
    ask.add_argument("text", help="the text to classify, or the message to answer")
    ask.add_argument("--stream", action="store_true", help="print generated text to stderr as it is produced")
    ask.add_argument("--max-new-tokens", type=int, metavar="N",
                     help="generate tasks: stop after N tokens (default: the task's generation.max_new_tokens)")
    command("tasks", _tasks, "list the tasks defined by the prompt files (and which have a learned head)")
    fit = command("fit", _fit, "teach a classify task from labelled examples: fits a small head on the model's "
                               "hidden states and writes it next to the task file")
    fit.add_argument("task", help="a classify task from the prompt files (see `llmqtt tasks`)")
    fit.add_argument("data", type=Path, help='labelled rows, one JSON object a line: {"text": ..., "label": ...}')
    fit.add_argument("--out", type=Path, help="head file to write (default: <task file>.head.safetensors beside it)")
    fit.add_argument("--test", type=Path, metavar="HELD_OUT.jsonl",
                     help="rows kept out of fitting: prints the prompt's and the head's accuracy on them")
    check = command("check-config", _check_config, "validate a config file and its task files")
    check.add_argument("file", nargs="?", type=Path, help="config file (same as --config)")
    doctor = command("doctor", _doctor, "show this machine's resources and the runtime plan")
    doctor.add_argument("--json", action="store_true", help="print the readings and the plan as JSON")
    doctor.add_argument("--bench", type=Path, action="append", default=[],
                        help="an `llmqtt bench` result.json from this board (repeatable, one per model): "
                             "its measured speed weighs in the model recommendation")
    model = command("model", _model, "manage models: `llmqtt model fetch demo` (or coder-1.5b), `llmqtt model where`")
    model.add_argument("action", choices=["fetch", "where"],
                       help="fetch: get the model ready (download/convert once); where: print its directory")
    model.add_argument("name", nargs="?", help="model to fetch (default: the configured one)")
    ha = command("ha", _ha, "Home Assistant: `llmqtt ha remove` clears this board's discovery configs and sensor "
                            "states from the broker (stop the daemon first)")
    ha.add_argument("action", choices=["remove"], help="remove: clear this node's discovery configs and states")
    bench = command("bench", _bench, "measure accuracy and speed on this machine; writes JSON, Markdown and a plot")
    bench.add_argument("--quick", action="store_true", help="small samples (a few minutes)")
    bench.add_argument("--out", type=Path, help="output directory (default: ./bench-out)")
    bench.add_argument("--only", choices=["mixed", "served"],
                       help="one section alone on the default config's engine (with the single-request speed it "
                            "compares to): `mixed` = sentiment while chats stream, 4 chats at once; `served` = "
                            "accuracy on the served path and peak RSS, for --compare")
    bench.add_argument("--rows", type=int, metavar="N",
                       help="accuracy on the first N test rows per language (default: 500, --quick 100)")
    bench.add_argument("--compare", type=Path, nargs="+", metavar="RESULT_JSON",
                       help="instead of measuring: put these result.json files (one bench run per model, each "
                            "with its own --config) side by side; with --out, also writes OUT/compare.md")
    return parser


def _bench(args) -> int:
    from .bench import main as bench_main

    if args.compare:
        from .bench.compare import main as compare_main

        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        return compare_main(args.compare, args.out / "compare.md" if args.out else None)
    return bench_main(_config(args), args.quick, args.out, args.only, args.rows)


def _config(args) -> Config:
    return load_config(getattr(args, "file", None) or args.config)


def _run(args) -> int:
    from .daemon import main as daemon_main

    return daemon_main(args.config, engine_factory=args.engine_factory)


def _tasks(args) -> int:
    config = _config(args)
    tasks, files = load_tasks(config.prompt_dirs()), task_files(config.prompt_dirs())
    for name, task in tasks.items():
        extra = f" labels: {', '.join(task.labels)}" if task.kind == "classify" else ""
        print(f"{name:<16} {task.kind:<9} {task.description}{extra}{_head_note(config, files[name])}")
    return 0


def _head_note(config: Config, task_file: Path) -> str:
    """' [head: ...]' for a task with learned heads: the one this config serves, else why none serves."""
    from .engine.headfile import head_paths

    notes = [_one_head_note(config, path) for path in head_paths(task_file)]
    return next((note for note, serves in notes if serves), notes[0][0] if notes else "")


def _one_head_note(config: Config, path: Path) -> tuple[str, bool]:
    """(' [head: ...]', whether this config serves it)."""
    from .config import choose_dtype
    from .engine import quantize_scheme
    from .engine.headfile import compute_scheme, read_meta, serves_under, weights_fingerprint
    from .engine.modelstore import locate_model

    try:
        meta = read_meta(path)
    except ValueError as exc:
        return f" [head: unreadable, ignored: {exc}]", False
    fitted = f"{100 * meta.get('cv_accuracy', 0):.1f} % cross-validated on {meta.get('rows', 0)} rows"
    model_dir = locate_model(config.model)
    if model_dir is None:
        return f" [head: {fitted}; model not fetched yet]", True
    if meta.get("fingerprint") != weights_fingerprint(model_dir):
        return f" [head: {fitted}, for another model: ignored]", False
    dtype = choose_dtype(config.model.dtype)
    serving = compute_scheme(dtype, quantize_scheme(config.model, dtype)[0])
    if not serves_under(meta.get("scheme", "?"), serving):
        return f" [head: {fitted}, fitted under {meta.get('scheme')}, this config computes {serving}: ignored]", False
    return f" [head: {fitted}, fitted under {meta.get('scheme')}]", True


def _fit(args) -> int:
    from tqdm import tqdm

    from .build import START_ERRORS, build_engine
    from .engine.headfile import head_path
    from .fit import FitDataError, fit, held_out_accuracy, read_rows

    config = _config(args)
    tasks, files = load_tasks(config.prompt_dirs()), task_files(config.prompt_dirs())
    task = tasks.get(args.task)
    if task is None or task.kind != "classify":
        known = ", ".join(sorted(n for n, t in tasks.items() if t.kind == "classify"))
        print(f"llmqtt: no classify task named {args.task!r} (classify tasks: {known})", file=sys.stderr)
        return 2
    try:
        rows = read_rows(args.data, list(task.labels))
        test = read_rows(args.test, list(task.labels), min_per_label=1) if args.test else []
    except FitDataError as exc:
        print(f"llmqtt: {exc}", file=sys.stderr)
        return 2
    out = args.out or head_path(files[args.task])
    # The daemon's own path to an engine (planned dtype, threads, quantization), so the head sees the hidden
    # states serving will see. No decode kernels or warm-up: fitting never generates.
    config = config.model_copy(update={"model": config.model.model_copy(update={"fast_decode": False})})
    try:
        engine = build_engine(config, {args.task: task}, factory=args.engine_factory, progress=_ProgressBar(),
                              warm=False).engine
    except START_ERRORS as exc:
        print(f"llmqtt: {exc}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(args.data.read_bytes()).hexdigest()
    info = {"model": engine.model_name, "fingerprint": engine.weights, "scheme": engine.dtype,
            "data": {"file": args.data.name, "sha256": digest}}
    bar = tqdm(total=len(rows), desc=f"fit {args.task}", unit="rows", file=sys.stderr)
    say = lambda text: print(f"llmqtt: {text}", file=sys.stderr)  # noqa: E731
    result = fit(engine, args.task, rows, info, tick=bar.update, say=say, collected=bar.close)
    result.head.save(out)
    meta = result.head.meta
    print(f"{args.task}: head on {result.head.features.describe()} (C={meta['C']}, temperature "
          f"{meta['temperature']}), cross-validated accuracy {100 * result.cv_accuracy:.1f} % on {meta['rows']} "
          f"rows ({meta['rows_per_s']} rows/s through the model); written to {out}")
    if test:
        acc = held_out_accuracy(engine, args.task, result.head, test)
        print(f"{args.task}: on {len(test)} held-out rows ({args.test.name}): prompt alone {100 * acc['prompt']:.1f} %, "
              f"with the head {100 * acc['head']:.1f} %")
    return 0


def _check_config(args) -> int:
    config = _config(args)
    tasks = load_tasks(config.prompt_dirs())
    problems = file_problems(config)
    for problem in problems:
        print(f"llmqtt: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"config ok: model {config.model.name!r}, {len(tasks)} tasks ({', '.join(tasks)}), "
          f"broker {config.mqtt.host}:{config.mqtt.port}")
    return 0


def _doctor(args) -> int:
    from .doctor import main as doctor_main

    return doctor_main(_config(args), args.json, bench_results=args.bench)


def _model(args) -> int:
    from .engine.modelstore import ModelUnavailable, locate_model, resolve_model

    config = _config(args)
    if args.name:
        config.model.name = args.name
    if args.action == "where":
        path = locate_model(config.model)
        print(path if path else f"{config.model.name}: not on this machine yet (llmqtt model fetch)")
        return 0 if path else 1
    try:
        resolved = resolve_model(config.model.model_copy(update={"auto_fetch": True}), _ProgressBar())
    except ModelUnavailable as exc:
        print(f"llmqtt: {exc}", file=sys.stderr)
        return 1
    print(f"{resolved.display_name} is ready at {resolved.path}")
    return 0


def _ha(args) -> int:
    from .ha_remove import remove_discovery

    config = _config(args)
    try:
        cleared = remove_discovery(config, load_tasks(config.prompt_dirs()))
    except ConnectionError as exc:
        print(f"llmqtt: {exc}", file=sys.stderr)
        return 1
    for topic in cleared:
        print(f"cleared {topic}")
    print(f"removed {len(cleared)} retained Home Assistant topics of node {config.mqtt.node}")
    return 0


def _ask(args) -> int:
    from .build import START_ERRORS, build_engine
    from .engine.types import EngineError

    config = _config(args)
    tasks = load_tasks(config.prompt_dirs())
    if args.task not in tasks:
        print(f"llmqtt: no task named {args.task!r} (tasks: {', '.join(sorted(tasks))})", file=sys.stderr)
        return 2
    # One answer and exit: compiling decode kernels in the background, or a warm-up request, would only cost time.
    config = config.model_copy(update={"model": config.model.model_copy(update={"fast_decode": False})})
    try:
        engine = build_engine(config, {args.task: tasks[args.task]}, factory=args.engine_factory,
                              progress=_ProgressBar(), warm=False).engine
    except START_ERRORS as exc:
        print(f"llmqtt: {exc}", file=sys.stderr)
        return 1
    try:
        result = _answer(engine, args)
    except EngineError as exc:
        print(json.dumps({"task": args.task, "status": "error", "error": {"code": exc.code, "message": str(exc)}},
                         ensure_ascii=False))
        return 1
    print(json.dumps({"task": args.task, "status": "ok", "model": engine.model_name, "result": result},
                     ensure_ascii=False))
    return 0


def _answer(engine, args) -> dict:
    if engine.tasks[args.task].kind == "classify":
        return engine.classify(args.task, [args.text])[0].as_dict()
    generation = engine.generate(args.task, args.text, max_new_tokens=args.max_new_tokens)
    for piece in generation:
        if args.stream:
            print(piece, end="", flush=True, file=sys.stderr)
    if args.stream:
        print(file=sys.stderr)
    r = generation.result
    return {"text": r.text.strip(), "finish_reason": r.finish_reason, "tokens": r.new_tokens,
            "tokens_per_s": round(r.tokens_per_s, 2)}


class _ProgressBar:
    """Renders modelstore progress callbacks: a line per stage, a bar where the total is known."""

    def __init__(self):
        self._stage, self._bar = None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self._stage:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._stage = stage
            if total:
                self._bar = tqdm(total=total, desc=stage, unit="B", unit_scale=True, file=sys.stderr)
            else:
                print(f"llmqtt: {stage}", file=sys.stderr)
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
