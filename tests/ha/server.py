"""A real Home Assistant for tests: `homeassistant` from the package index in its own virtualenv (install_ha.sh),
a generated config, onboarded through its API, its MQTT integration pointed at a test broker.

Use it through the session fixtures (registered in tests/conftest.py):

- `ha_broker`: a mosquitto for the session with the shipped ACL (deploy/mosquitto/acl) and one password per
  ACL user (`ha_broker.users`: llmqtt, homeassistant, device).
- `home_assistant`: a started, onboarded `HomeAssistant` connected to `ha_broker` as user `homeassistant`,
  with deploy/homeassistant's script and automations loaded. Stopped at the end of the session.

`HomeAssistant` speaks HA's REST API (`states`, `wait_state`, `call`, `render`, `get`, `post`), so a test
checks what a person would see in HA; `config_flow(handler, *answers)` adds an integration as the UI would
(e.g. `config_flow("ollama", {"url": ...})`; the venv has the ollama integration's requirements). Other tests
can build their own instance with `HomeAssistant(config_dir, ...)` and `extra_config` (configuration.yaml).

Without the HA virtualenv the fixtures fail under CI and skip elsewhere (tests/needs.py), like mosquitto.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from broker import SHIPPED_ACL, Broker, TestClient, free_port, mosquitto_path
from needs import missing

REPO = Path(__file__).resolve().parents[2]
INSTALL = Path(__file__).resolve().parent / "install_ha.sh"
DEFAULT_VENV = Path.home() / ".cache" / "llmqtt-test" / "ha-venv"
# The releases test_homeassistant_real.py runs against (deploy/setup.sh installs both): the newest that runs on
# Python 3.13.0, and the minimum docs/homeassistant.md states. `home_assistant` is the first.
RELEASES = {"2025.4.4": DEFAULT_VENV, "2024.10.4": DEFAULT_VENV.with_name("ha-venv-2024.10")}
START_TIMEOUT_S = 300.0  # first start on 2 busy cores compiles HA's bytecode: about a minute, seen up to 3
USER, PASSWORD = "tester", "tester-pw-1234"


def ha_venv() -> Path:
    return Path(os.environ.get("LLMQTT_HA_VENV", DEFAULT_VENV))


def ha_python(venv: Path | None = None) -> Path | None:
    """The HA virtualenv's interpreter, when install_ha.sh has completed there."""
    venv = venv or ha_venv()
    python = venv / "bin" / "python"
    return python if python.is_file() and any(venv.glob(".llmqtt-ha-*")) else None


class HomeAssistant:
    """One Home Assistant process with its own config directory and HTTP port."""

    def __init__(self, config_dir: Path, *, mqtt: dict[str, Any] | None = None,
                 extra_config: dict[str, Any] | None = None, scripts: str = "", automations: str = "[]",
                 python: Path | None = None):
        self.dir = config_dir
        self.python = python or ha_python()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mqtt = mqtt  # {"broker", "port", "username", "password"}: set up the MQTT integration
        self.process: subprocess.Popen | None = None
        self._token: str | None = None
        self._refresh: str | None = None
        self._token_time = 0.0
        self.dir.mkdir(parents=True, exist_ok=True)
        config = {
            "homeassistant": {"name": "llmqtt test", "latitude": 52.52, "longitude": 13.40, "elevation": 34,
                              "unit_system": "metric", "time_zone": "UTC", "currency": "EUR",
                              "country": "DE", "language": "en"},
            "http": {"server_host": "127.0.0.1", "server_port": self.port},
            "logger": {"default": "info"},
            **(extra_config or {}),
        }
        text = yaml.safe_dump(config, sort_keys=False)
        text += "script: !include scripts.yaml\nautomation: !include automations.yaml\n"
        (self.dir / "configuration.yaml").write_text(text, encoding="utf-8")
        (self.dir / "scripts.yaml").write_text(scripts, encoding="utf-8")
        (self.dir / "automations.yaml").write_text(automations, encoding="utf-8")

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> HomeAssistant:
        """Start, onboard (first start) or log in again, and set up MQTT; returns when the API answers."""
        started = time.monotonic()
        log = open(self.dir / "stdout.log", "ab")
        # --skip-pip: install_ha.sh installed every requirement; a test must not wait on pip (or the network).
        self.process = subprocess.Popen(
            [str(self.python), "-m", "homeassistant", "--config", str(self.dir), "--skip-pip", "--log-no-color"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ""})
        log.close()
        self._wait_for_api(started + timeout)
        if self._refresh is None:
            self._onboard()
        if self.mqtt and not self.config_entries("mqtt"):
            self._add_mqtt()
            # MQTT triggers could not attach before MQTT was set up; turning automations off and on attaches
            # them (a reload would skip automations whose config did not change).
            self.call("automation", "turn_off", {"entity_id": "all"})
            self.call("automation", "turn_on", {"entity_id": "all"})
        self.startup_s = time.monotonic() - started
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        path = self.dir / "home-assistant.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_for_api(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Home Assistant exited ({self.process.returncode}):\n"
                                   f"{(self.dir / 'stdout.log').read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/onboarding", timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):  # onboarded already: the API is up and wants a token
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Home Assistant's API did not come up within the timeout:\n{self.log()[-4000:]}")

    # -- auth: onboarding creates the owner and hands out an auth code; tokens last 30 minutes --------

    def _onboard(self) -> None:
        client_id = f"{self.url}/"
        created = self._raw("POST", "/api/onboarding/users", {
            "client_id": client_id, "name": "Tester", "username": USER, "password": PASSWORD, "language": "en"})
        self._grant({"grant_type": "authorization_code", "code": created["auth_code"], "client_id": client_id})
        # The remaining onboarding steps only serve the UI (core_config would also add weather, radio and
        # text-to-speech integrations, whose requirements we do not install): the API works without them.

    def _grant(self, form: dict[str, str]) -> None:
        body = urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(f"{self.url}/auth/token", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            tokens = json.loads(response.read())
        self._token, self._token_time = tokens["access_token"], time.monotonic()
        self._refresh = tokens.get("refresh_token", self._refresh)

    def token(self) -> str:
        if time.monotonic() - self._token_time > 20 * 60:
            self._grant({"grant_type": "refresh_token", "refresh_token": self._refresh, "client_id": f"{self.url}/"})
        return self._token

    # -- REST --------------------------------------------------------------------------------------

    def _raw(self, method: str, path: str, data: Any = None, token: str | None = None, timeout: float = 30,
             parse: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None
        content = raw.decode()
        if not parse:
            return content
        try:
            return json.loads(content) if content else None
        except ValueError:
            return content

    def get(self, path: str) -> Any:
        return self._raw("GET", path, token=self.token())

    def post(self, path: str, data: Any = None, timeout: float = 30) -> Any:
        return self._raw("POST", path, data if data is not None else {}, token=self.token(), timeout=timeout)

    def states(self) -> dict[str, dict]:
        return {s["entity_id"]: s for s in self.get("/api/states")}

    def state(self, entity_id: str) -> dict | None:
        return self.states().get(entity_id)

    def wait_state(self, entity_id: str, where: Callable[[dict], bool] = lambda s: True,
                   timeout: float = 30.0) -> dict:
        """The entity's state object once `where` holds for it (bounded)."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            last = self.state(entity_id)
            if last is not None and where(last):
                return last
            time.sleep(0.2)
        raise AssertionError(f"{entity_id} did not reach the expected state within {timeout}s; last: {last}")

    def call(self, domain: str, service: str, data: dict | None = None, *, response: bool = False,
             timeout: float = 150) -> Any:
        """An action, as Developer tools -> Actions would call it; `response=True` returns its response."""
        path = f"/api/services/{domain}/{service}" + ("?return_response" if response else "")
        result = self.post(path, data or {}, timeout=timeout)
        return result["service_response"] if response else result

    def render(self, template: str, **variables: Any) -> str:
        """A template rendered by HA's own engine (POST /api/template)."""
        return self._raw("POST", "/api/template", {"template": template, "variables": variables}, token=self.token(),
                         parse=False)

    def config_entries(self, domain: str) -> list[dict]:
        return [e for e in self.get("/api/config/config_entries/entry") if e["domain"] == domain]

    def config_flow(self, handler: str, *steps: dict[str, Any]) -> dict:
        """Settings -> Devices & services -> Add integration -> `handler`, answering each form with the next of
        `steps`; returns the flow's last answer (`type` is `create_entry` when an entry was made)."""
        flow = self.post("/api/config/config_entries/flow", {"handler": handler, "show_advanced_options": False})
        for answer in steps:
            flow = self.post(f"/api/config/config_entries/flow/{flow['flow_id']}", answer)
        return flow

    def wait_entry_loaded(self, domain: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["state"] == "loaded" for e in self.config_entries(domain)):
                return
            time.sleep(0.3)
        raise AssertionError(f"the {domain} integration did not load: {self.config_entries(domain)}")

    def _add_mqtt(self) -> None:
        answer = {"broker": self.mqtt["broker"], "port": self.mqtt["port"]}
        if self.mqtt.get("username"):
            answer.update(username=self.mqtt["username"], password=self.mqtt["password"])
        done = self.config_flow("mqtt", answer)
        assert done.get("type") == "create_entry", done
        self.wait_entry_loaded("mqtt")


# -- the session's broker and Home Assistant ---------------------------------------------------------

class AclBroker(Broker):
    """mosquitto with the shipped ACL and a password per ACL user (`users`)."""

    def __init__(self, executable: str, workdir: Path):
        users = {name: f"{name}-pw" for name in ("llmqtt", "homeassistant", "device", "doorbell")}
        # Test additions: a doorbell publishing notes that HA's automation example reads.
        acl = SHIPPED_ACL.read_text(encoding="utf-8")
        acl = acl.replace("user homeassistant\n", "user homeassistant\ntopic read doorbell/#\n", 1)
        super().__init__(executable, workdir, users=users, acl=acl + "\nuser doorbell\ntopic write doorbell/#\n")
        self.clients: list[TestClient] = []

    def client_as(self, user: str, protocol: str = "5") -> TestClient:
        """A test client logged in as one of the ACL's users."""
        client = TestClient(self, protocol, user=user)
        self.clients.append(client)
        return client

    def password_file(self, user: str) -> Path:
        path = self.dir / f"{user}.password"
        path.write_text(self.users[user], encoding="utf-8")
        return path


@contextmanager
def acl_broker_running(directory: Path) -> Iterator[AclBroker]:
    executable = mosquitto_path()
    if executable is None:
        missing("mosquitto (apt install mosquitto)")
    instance = AclBroker(executable, directory)
    instance.start()
    try:
        yield instance
    finally:
        for client in instance.clients:
            client.close()
        instance.stop()


@contextmanager
def home_assistant_running(directory: Path, broker: AclBroker, venv: Path | None = None) -> Iterator[HomeAssistant]:
    """A started Home Assistant from `venv` (default: ha_venv()) on `broker` as user `homeassistant`, with
    deploy/homeassistant's script and automations; stopped afterwards."""
    python = ha_python(venv)
    if python is None:
        missing(f"Home Assistant (bash {INSTALL.relative_to(REPO)}; expected in {venv or ha_venv()})")
    deploy = REPO / "deploy" / "homeassistant"
    instance = HomeAssistant(
        directory, python=python,
        mqtt={"broker": broker.host, "port": broker.port, "username": "homeassistant",
              "password": broker.users["homeassistant"]},
        scripts=(deploy / "script.yaml").read_text(encoding="utf-8"),
        automations=(deploy / "automation.yaml").read_text(encoding="utf-8"))
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def ha_broker(tmp_path_factory):
    with acl_broker_running(tmp_path_factory.mktemp("ha-mosquitto")) as broker:
        yield broker


@pytest.fixture(scope="session")
def home_assistant(ha_broker, tmp_path_factory):
    with home_assistant_running(tmp_path_factory.mktemp("home-assistant"), ha_broker) as hass:
        yield hass
