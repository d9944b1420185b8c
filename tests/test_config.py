from pathlib import Path

import pytest

from llmqtt.config import Config, ConfigError, file_problems, load_config


def test_no_file_means_working_defaults():
    config = load_config(None)
    assert config.model.name == "demo" and config.model.dtype == "auto"
    assert config.mqtt.port == 1883 and config.mqtt.protocol == "5"
    assert config.prompt_dirs()[0].is_dir()


def test_model_shorthand_and_relative_paths(tmp_path):
    (tmp_path / "my.gguf").write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text("model: ./my.gguf\nprompts: prompts\nmqtt: {password_file: pw, username: u}\n")
    config = load_config(path)
    assert config.model.name == str(tmp_path / "my.gguf")
    assert config.prompts == [tmp_path / "prompts"]
    assert config.mqtt.password_file == tmp_path / "pw"


@pytest.mark.parametrize("text, field", [
    ("mqtt: {port: 70000}", "mqtt.port"),
    ("model: {dtype: int4}", "model.dtype"),
    ("runtime: {max_batch: 0}", "runtime.max_batch"),
    ("mqtt: {password_file: /x}", "mqtt"),
    ("mqtt: {tls: {cert_file: /c}}", "mqtt.tls"),
    ("mqtt: {prot: 5}", "mqtt.prot"),
])
def test_errors_name_the_field(tmp_path, text, field):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: {field}" in str(err.value)


def test_password_is_read_from_file_and_not_in_the_model(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    config = Config.model_validate({"mqtt": {"username": "u", "password_file": str(tmp_path / "pw")}})
    assert config.mqtt.read_password() == "s3cret"
    assert "s3cret" not in config.model_dump_json()


def test_topic_root_uses_node_id():
    assert Config.model_validate({"mqtt": {"node_id": "pi5"}}).mqtt.topic_root == "llmqtt/pi5"
    assert Config().mqtt.topic_root.startswith("llmqtt/")


def test_environment_variables_expand_in_paths(tmp_path, monkeypatch, repo_root):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/llmqtt.service")
    config = load_config(repo_root / "configs" / "pi5-4gb.yaml")
    assert config.mqtt.password_file == Path("/run/credentials/llmqtt.service/mqtt-password")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    config = load_config(repo_root / "configs" / "pi5-4gb.yaml")  # check-config from a shell still works
    with pytest.raises(ConfigError, match="mqtt.password_file: .*not set"):
        config.mqtt.read_password()


def test_files_named_in_the_config_are_checked_naming_the_field(tmp_path):
    (tmp_path / "model").mkdir()  # a directory without config.json
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    path = tmp_path / "c.yaml"
    path.write_text("model: ./model\n"
                    "mqtt: {username: u, password_file: missing-pw,\n"
                    "       tls: {ca_file: missing-ca.crt, cert_file: not-a-cert.pem, key_file: missing.key}}\n")
    problems = file_problems(load_config(path))
    assert f"mqtt.password_file: {tmp_path / 'missing-pw'} does not exist" in problems
    assert f"mqtt.tls.ca_file: {tmp_path / 'missing-ca.crt'} does not exist" in problems
    assert f"mqtt.tls.key_file: {tmp_path / 'missing.key'} does not exist" in problems
    assert any(p.startswith("model.name: ") and "no config.json" in p for p in problems), problems
    assert len(problems) == 4, problems
    path.write_text("model: ./gone.gguf\nmqtt: {tls: {ca_file: not-a-cert.pem}}\n")
    problems = file_problems(load_config(path))
    assert problems[0].startswith("mqtt.tls.ca_file: ") and "no PEM certificate" in problems[0]
    assert problems[1] == f"model.name: {tmp_path / 'gone.gguf'} does not exist"
    assert file_problems(load_config(None)) == []  # demo model, no files


def test_check_config_reports_missing_files_and_fails(tmp_path, capsys):
    from llmqtt.cli import main

    (tmp_path / "model").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text("model: ./model\nmqtt: {username: u, password_file: pw, tls: {ca_file: ca.crt}}\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    for field in ("mqtt.password_file", "mqtt.tls.ca_file", "model.name"):
        assert f"llmqtt: {field}: " in err
    assert "config ok" not in err
