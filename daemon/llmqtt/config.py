"""The daemon's configuration file (YAML), typed and validated at the edge.

Every section has defaults, so an empty file (or none) is a working config: the demo model, the bundled
prompts, a broker on localhost. Errors name the field, e.g. `mqtt.port: Input should be less than 65536`.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .mqtt.routes import is_topic_filter

from .validation import describe


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    # A built-in model (`demo`: the 0.5B, `coder-1.5b`; README "Models"), a Hugging Face id
    # (`Qwen/Qwen2.5-0.5B-Instruct`), a local directory, or a local `.gguf` file.
    name: str = "demo"
    # `auto` is float32 (bf16 measured mixed on CPUs: docs/bench); ask for bfloat16 explicitly.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Quantized weights, made once and kept in cache_dir (docs/quantization.md). `auto`: the scheme for this
    # CPU (choose_quantize; `llmqtt doctor` says which and why); `none`: float32; `int8` (any CPU);
    # `int4` (aarch64 with torch's KleidiAI kernels, e.g. a Raspberry Pi 5).
    quantize: Literal["auto", "none", "int8", "int4"] = "auto"
    # After quantizing, keep the float32 checkpoint converted from a GGUF (2.5 GB for the demo model)? Only
    # `quantize: none` and re-quantizing after a library upgrade read it; without it those convert again.
    keep_float32: bool = True
    # Where converted models (GGUF -> safetensors) and the demo model live; default: see modelstore.
    cache_dir: Path | None = None
    # Longest prompt + answer the daemon will run, in tokens; bounds the KV cache.
    max_context: int = Field(default=2048, ge=128, le=131072)
    # Fetch the demo model / hub models automatically on first use.
    auto_fetch: bool = True
    # Keep each task's prompt prefix (system prompt + examples, as KV cache) in cache_dir, so a restart
    # loads it instead of recomputing it. Keyed by model files, dtype and prompt: never stale.
    prefix_cache: bool = True
    # float32 without int8: decode's matrix-vector products through kernels compiled after start (needs a C
    # compiler, e.g. gcc); until they are ready, or if compiling fails, torch's own kernels (same results).
    fast_decode: bool = True
    # KV of recent conversations kept for clients that resend their history each turn (HTTP APIs): the
    # next turn reuses the longest common token prefix and runs only its new tokens. ~24 KiB per token
    # for the demo model; 0 turns it off.
    conversation_cache_tokens: int = Field(default=4096, ge=0)
    # `exact`: reuse up to the first token that differs (answers as without the cache). `tolerant`: also past
    # one short same-length change such as the time stamp Home Assistant puts at the start of its system
    # prompt every turn; the KV after it was computed beside the old text, so answers may differ slightly.
    conversation_cache_mode: Literal["exact", "tolerant"] = "exact"


class SessionConfig(_Section):
    max_sessions: int = Field(default=64, ge=1)
    idle_ttl_s: float = Field(default=1800, gt=0)


class RuntimeConfig(_Section):
    threads: int | Literal["auto"] = "auto"
    interop_threads: int | Literal["auto"] = "auto"
    max_batch: int = Field(default=16, ge=1, le=256)
    # Chats decoding side by side, sharing each decode step (one forward for all); more wait in the queue.
    # Each holds a KV cache of model.max_context positions (the demo model: 48 MiB at 2048); the planner
    # lowers this to what fits in memory.
    max_generations: int = Field(default=4, ge=1, le=64)
    queue_size: int = Field(default=64, ge=1, le=100000)
    max_payload_bytes: int = Field(default=16384, ge=64)
    max_text_chars: int = Field(default=4000, ge=1)
    default_deadline_ms: int | None = Field(default=None, ge=1)
    # Below this much available memory, new generation work is refused with `low_memory`.
    low_memory_mb: int | Literal["auto"] = "auto"
    warmup: bool = True
    # On SIGTERM, how long the running requests (every active generation) may take to finish before they are
    # left for redelivery.
    stop_grace_s: float = Field(default=20.0, gt=0, le=600)
    sessions: SessionConfig = SessionConfig()


class TlsConfig(_Section):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False  # skip host name verification (self-signed test brokers only)

    @model_validator(mode="after")
    def _cert_with_key(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class FleetConfig(_Section):
    """Several boards share one request stream through an MQTT shared subscription."""

    enabled: bool = False
    group: str = Field(default="llmqtt", pattern=r"^[^/+#$]+$")
    # Requests arrive on `<topic>/request/<task>` via `$share/<group>/<topic>/request/<task>`.
    topic: str = "llmqtt/fleet"


class MqttConfig(_Section):
    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None  # default: llmqtt-<node_id>
    username: str | None = None
    password_file: Path | None = None  # never put the password itself in the config
    tls: TlsConfig | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    base_topic: str = Field(default="llmqtt", pattern=r"^[^+#]+$")
    node_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")  # default: host name
    session_expiry_s: int = Field(default=3600, ge=0)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    health_interval_s: float = Field(default=30.0, ge=1)
    dedup_cache_size: int = Field(default=512, ge=0)
    # Requests that arrive while the queue (runtime.queue_size) is full wait, unacknowledged, in the daemon up
    # to this many, then go to the queue as it drains; only beyond this are they answered `busy`. Brokers
    # send more than Receive Maximum allows (mosquitto 2.0.11), and 3.1.1 has no such limit. Memory: at most
    # this many payloads (runtime.max_payload_bytes each; a typical request is ~100 bytes).
    max_held_requests: int = Field(default=1000, ge=0)
    # Topic filters a request may name as its reply route (MQTT v5 Response Topic or `reply_to`). Default:
    # `<root>/reply/#` and `<root>/response/+` (and the fleet's). The discovery prefix, other nodes' roots,
    # `$` topics and this node's status/health/request/cancel/ha topics are refused whatever this says.
    reply_topics: list[str] | None = None
    fleet: FleetConfig = FleetConfig()

    @field_validator("reply_topics")
    @classmethod
    def _filters(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            if not is_topic_filter(item) or item.startswith("$"):
                raise ValueError(f"{item!r} is not a topic filter (`+`/`#` only as whole levels, no `$` topics)")
        return value

    @model_validator(mode="after")
    def _password_needs_user(self) -> MqttConfig:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        return self

    @property
    def node(self) -> str:
        return self.node_id or _safe_hostname()

    @property
    def topic_root(self) -> str:
        return f"{self.base_topic.rstrip('/')}/{self.node}"

    def read_password(self) -> str | None:
        if self.password_file is None:
            return None
        if "$" in str(self.password_file):
            raise ConfigError(f"mqtt.password_file: {self.password_file} names an environment variable that is "
                              "not set (under systemd, CREDENTIALS_DIRECTORY comes with LoadCredential=)")
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {self.password_file}: {exc.strerror}") from None


class HomeAssistantConfig(_Section):
    # MQTT discovery: the board, its tasks and its health show up in Home Assistant (docs/homeassistant.md).
    enabled: bool = True
    discovery_prefix: str = Field(default="homeassistant", pattern=r"^[^+#]+$")
    # Also show results of requests that did not come from Home Assistant in its sensors.
    update_from_all_requests: bool = False
    # Shown by Home Assistant as the discovery origin's support link; none by default.
    support_url: str | None = None


class HttpConfig(_Section):
    """Ollama- and OpenAI-compatible APIs, the task endpoints and a web page (docs/http-api.md)."""

    enabled: bool = False
    # Loopback by default. Home Assistant's Ollama integration sends no token: serve it on a trusted LAN.
    host: str = "127.0.0.1"
    port: int = Field(default=11434, ge=0, le=65535)  # Ollama's port, so clients find it; 0 picks a free one
    # With a token file, every endpoint but /healthz (and the page itself) needs `Authorization: Bearer <token>`.
    token_file: Path | None = None
    # Whole request bodies; a chat client sends its whole history every turn.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # `POST /api/infer {"task": "auto"}` asks this classify task (its labels are task names) where to go.
    router_task: str = "route"

    def read_token(self) -> str | None:
        if self.token_file is None:
            return None
        if "$" in str(self.token_file):
            raise ConfigError(f"http.token_file: {self.token_file} names an environment variable that is not set")
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"http.token_file: cannot read {self.token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"http.token_file: {self.token_file} is empty")
        return token


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # auto: journald when started by systemd (JOURNAL_STREAM), else text on stderr.
    format: Literal["auto", "text", "json", "journal"] = "auto"


class Config(_Section):
    model: ModelConfig = ModelConfig()
    # Directories of task files; later ones override tasks of the same name. Default: bundled prompts.
    prompts: list[Path] = []
    runtime: RuntimeConfig = RuntimeConfig()
    mqtt: MqttConfig = MqttConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("model"), str):  # `model: demo`
                data["model"] = {"name": data["model"]}
            if isinstance(data.get("prompts"), (str, Path)):
                data["prompts"] = [data["prompts"]]
        return data

    def prompt_dirs(self) -> list[Path]:
        from .tasks import bundled_prompts_dir

        return list(self.prompts) or [bundled_prompts_dir()]


def _safe_hostname() -> str:
    name = socket.gethostname().split(".")[0]
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "llmqtt"


def load_config(path: Path | None) -> Config:
    """Read a config file; relative paths inside it are taken relative to the file."""
    if path is None:
        return Config()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe(exc, whole='config')}") from None
    return _resolve_paths(config, Path(path).resolve().parent)


def _resolve_paths(config: Config, base: Path) -> Config:
    """Expand `${VAR}` (e.g. systemd's ${CREDENTIALS_DIRECTORY}) and make relative paths relative to `base`."""

    def fix(p: Path | None, field: str) -> Path | None:
        if p is None:
            return None
        expanded = os.path.expandvars(str(p))
        if "$" in expanded:  # unset here (e.g. check-config from a shell); read_password() says so if used
            return Path(expanded)
        path = Path(expanded).expanduser()
        return path if path.is_absolute() else base / path

    config.prompts = [fix(p, "prompts") for p in config.prompts]
    config.model.cache_dir = fix(config.model.cache_dir, "model.cache_dir")
    name = config.model.name
    if name.startswith(("./", "../", "~", "$")) or name.endswith(".gguf"):
        config.model.name = str(fix(Path(name), "model.name"))
    config.mqtt.password_file = fix(config.mqtt.password_file, "mqtt.password_file")
    config.http.token_file = fix(config.http.token_file, "http.token_file")
    if config.mqtt.tls:
        tls = config.mqtt.tls
        tls.ca_file = fix(tls.ca_file, "mqtt.tls.ca_file")
        tls.cert_file = fix(tls.cert_file, "mqtt.tls.cert_file")
        tls.key_file = fix(tls.key_file, "mqtt.tls.key_file")
    return config


def file_problems(config: Config) -> list[str]:
    """Every file the config names, checked before anything slow happens (the model load takes minutes on a
    board): one line per problem, naming the field, e.g. `mqtt.tls.ca_file: /etc/x/ca.crt does not exist`.
    `llmqtt run` refuses to start with any; `llmqtt check-config` lists them."""
    problems = []
    mqtt = config.mqtt
    for field, path in (("mqtt.password_file", mqtt.password_file),
                        *((f"mqtt.tls.{name}", getattr(mqtt.tls, name)) for name in ("ca_file", "cert_file", "key_file")
                          if mqtt.tls is not None)):
        problem = _unreadable(path)
        if problem:
            problems.append(f"{field}: {problem}")
    tls = mqtt.tls
    if tls is not None and tls.ca_file is not None and not _unreadable(tls.ca_file):
        try:
            ssl.create_default_context(cafile=str(tls.ca_file))
        except (ssl.SSLError, ValueError) as exc:
            problems.append(f"mqtt.tls.ca_file: {tls.ca_file} holds no PEM certificate ({exc})")
    if tls is not None and tls.cert_file and tls.key_file and not (_unreadable(tls.cert_file) or _unreadable(tls.key_file)):
        try:
            ssl.create_default_context().load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, ValueError) as exc:
            problems.append(f"mqtt.tls.cert_file/key_file: {tls.cert_file} and {tls.key_file} are not a "
                            f"certificate and its key ({exc})")
    problem = _model_problem(config.model.name)
    if problem:
        problems.append(f"model.name: {problem}")
    return problems


def _unreadable(path: Path | None) -> str | None:
    if path is None or "$" in str(path):  # a variable set only where it runs (systemd's CREDENTIALS_DIRECTORY)
        return None
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return f"{path} does not exist"
    except IsADirectoryError:
        return f"{path} is a directory, not a file"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"


def _model_problem(name: str) -> str | None:
    """A local model that is not there or not a model; built-in names and hub ids are resolved when the daemon starts."""
    path = Path(name)
    if name == "demo":
        return None
    if path.is_dir():
        return None if (path / "config.json").is_file() else \
            f"model directory {path} has no config.json (not a Hugging Face model directory)"
    if path.is_absolute() or name.endswith(".gguf"):
        return _unreadable(path)
    return None


def choose_dtype(requested: str) -> str:
    """The compute dtype: what the config asks for; `auto` is float32, chosen explicitly.

    transformers 5's own `auto` takes the checkpoint's dtype (usually bf16), which on a CPU without bf16
    instructions (the Pi 5's Cortex-A76) runs ~2x slower than fp32. With native bf16 (the AVX512-BF16 x86
    bench machine, docs/bench) it is mixed: decode ~1.8x faster, prompt prefill slower, the first call at
    each new input shape very slow (oneDNN compiles kernels), and sentiment accuracy lower on the bench
    sample. So bf16 is opt-in where someone has measured it to pay off. torch's dynamic int8 needs float32.
    """
    return "float32" if requested == "auto" else requested


# Sentiment accuracy of each scheme minus float32's on the bench's full sample (500 test rows per language,
# bench/data, the path the daemon serves), in points, mean over languages; `auto` never picks a scheme more
# than 1 point below float32. None: not measured yet. int8 (llmqtt's AVX2 kernel): the learned head, en 92.6 %
# vs 92.6 %, zh 83.4 % vs 83.8 % (full bench, 2026-11-29 18:27 UTC; docs/quantization.md).
ACCURACY_VS_FLOAT32_POINTS: dict[str, float | None] = {"int8": -0.2, "int4": None}
MAX_AUTO_DROP_POINTS = 1.0


def choose_quantize(requested: str, arch: str, cpu_flags: frozenset[str] | set[str],
                    dtype: str = "float32") -> tuple[str, str]:
    """(scheme, why) for `model.quantize`: a pure function of the CPU, so it is tested without the hardware.

    aarch64 with dot-product instructions (`asimddp`; the Pi 5's Cortex-A76 has them) -> int4 through the
    KleidiAI kernels in torch's aarch64 builds. Elsewhere -> int8 (fbgemm on x86). int4 is never chosen on
    x86: torch's x86 build has no KleidiAI, so its int4 product is scalar reference code.
    """
    if requested != "auto":
        return requested, f"model.quantize: {requested} in the config"
    if dtype != "float32":
        return "none", f"model.dtype: {dtype} asks for float weights at that dtype"
    if arch in ("aarch64", "arm64") and "asimddp" in cpu_flags:
        candidates = [("int4", f"{arch} with dot-product instructions (asimddp): int4 x int8 on KleidiAI")]
    elif arch in ("aarch64", "arm64"):
        candidates = []  # KleidiAI's int4 kernels need dotprod; torch's qnnpack int8 lacks per-channel speed
    else:
        candidates = [("int8", f"{arch}: int8 weights x int8 dynamic activations")]
    for scheme, why in candidates:
        delta = ACCURACY_VS_FLOAT32_POINTS.get(scheme)
        if delta is not None and delta < -MAX_AUTO_DROP_POINTS:
            return "none", (f"{scheme} would fit this CPU ({why}) but measured {-delta:.1f} points below float32 "
                            f"(more than {MAX_AUTO_DROP_POINTS:g}): float32")
        measured = "not measured yet" if delta is None else f"{delta:+.1f} points vs float32 on the bench sample"
        return scheme, f"{why}; accuracy {measured}"
    return "none", f"{arch} without dot-product instructions: no fast quantized kernels, float32"


INT8_KERNEL_TOOLS = ("c++", "ninja")  # building llmqtt's kernel (engine/kernels.py) needs both on PATH
OUR_INT8_KERNEL = "llmqtt AVX2"  # its name in doctor, the log and the bench; the other is "fbgemm"


def choose_int8_kernel(arch: str, cpu_flags: frozenset[str] | set[str], tools_found: set[str]) -> tuple[str, str]:
    """(kernel, why) for int8 products: llmqtt's own AVX2 loop (engine/int8_avx2.cpp, built once per machine)
    where it can be built and run, else fbgemm. Pure, like choose_quantize; the engine builds the kernel and
    falls back to fbgemm if the build fails."""
    if arch.lower() not in ("x86_64", "amd64"):
        return "fbgemm", f"{arch}: llmqtt's int8 kernel is x86 (AVX2) code"
    if "avx2" not in cpu_flags:
        return "fbgemm", "the CPU has no AVX2, which llmqtt's int8 kernel needs"
    missing = [tool for tool in INT8_KERNEL_TOOLS if tool not in tools_found]
    if missing:
        return "fbgemm", f"{' and '.join(missing)} not installed, needed to build llmqtt's int8 kernel once (Debian: g++ ninja-build)"
    return OUR_INT8_KERNEL, "AVX2, built once per machine (reads weights ~1.3x faster than fbgemm one row at a time)"
