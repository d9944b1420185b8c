"""`llmqtt` command line: a thin layer that parses arguments and calls one module per subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, file_problems, load_config
from .tasks import TaskFileError, load_tasks


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
    command("tasks", _tasks, "list the tasks defined by the prompt files")
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
    return bench_main(_config(args), args.quick, args.out)


def _config(args) -> Config:
    return load_config(getattr(args, "file", None) or args.config)


def _run(args) -> int:
    from .daemon import main as daemon_main

    return daemon_main(args.config, engine_factory=args.engine_factory)


def _tasks(args) -> int:
    config = _config(args)
    for name, task in load_tasks(config.prompt_dirs()).items():
        extra = f" labels: {', '.join(task.labels)}" if task.kind == "classify" else ""
        print(f"{name:<16} {task.kind:<9} {task.description}{extra}")
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
