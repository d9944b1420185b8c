"""The example configs in configs/ load with the daemon's own loader (a misspelt field fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmqtt.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROFILES = ["local", "pi5-4gb", "pi5-8gb", "x86-minipc"]
SYSTEMD_PROFILES = ["pi5-4gb", "pi5-8gb", "x86-minipc"]


def test_every_config_file_is_checked() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_loads(profile: str) -> None:
    config = load_config(CONFIGS / f"{profile}.yaml")
    assert config.model.name
    assert config.mqtt.host


def test_local_profile_needs_no_broker_account_and_uses_the_demo_model() -> None:
    config = load_config(CONFIGS / "local.yaml")
    assert config.model.name == "demo"
    assert (config.mqtt.host, config.mqtt.username, config.mqtt.password_file) == ("localhost", None, None)


@pytest.mark.parametrize("profile", SYSTEMD_PROFILES)
def test_systemd_profiles_take_the_password_from_the_credential(profile: str) -> None:
    """llmqtt.service hands /etc/llmqtt/mqtt-password over as the credential `mqtt-password`."""
    raw = yaml.safe_load((CONFIGS / f"{profile}.yaml").read_text())
    assert raw["mqtt"]["username"] == "llmqtt"
    assert raw["mqtt"]["password_file"] == "${CREDENTIALS_DIRECTORY}/mqtt-password"
    # The converted model goes to systemd's $CACHE_DIRECTORY; a cache_dir here would be read-only.
    assert "cache_dir" not in raw["model"]


def test_smaller_board_gets_smaller_limits() -> None:
    small, large = (load_config(CONFIGS / f"{p}.yaml") for p in ("pi5-4gb", "pi5-8gb"))
    assert small.model.quantize == "int8"
    assert small.model.max_context <= large.model.max_context
    assert small.runtime.max_batch <= large.runtime.max_batch


def test_a_misspelt_field_is_refused(tmp_path: Path) -> None:
    """The guard the tests above rely on: unknown keys are errors, not silently ignored."""
    text = (CONFIGS / "pi5-4gb.yaml").read_text().replace("max_batch:", "max_batches:")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="max_batches"):
        load_config(path)


@pytest.mark.parametrize(("profile", "board"), [("pi5-4gb", "PI5_4GB"), ("pi5-8gb", "PI5_8GB"),
                                                ("x86-minipc", "MINIPC")])
def test_board_configs_name_the_model_the_doctor_recommends(profile: str, board: str) -> None:
    """`llmqtt doctor --config <profile>` on that board (fake readings) recommends the model the file names,
    and says why in the report; the file's comment gives the same reason."""
    import test_modelchoice
    from llmqtt.doctor import build_report, format_report

    config = load_config(CONFIGS / f"{profile}.yaml")
    report = build_report(config, readings=getattr(test_modelchoice, board), locate=lambda _model: None)
    assert report["recommendation"]["name"] == config.model.name
    assert f"Recommended model\n  this board: {config.model.name} fits" in format_report(report)
    other = next(n for n in ("demo", "coder-1.5b") if n != config.model.name)
    assert other in (CONFIGS / f"{profile}.yaml").read_text()  # the comment says why not the other one
