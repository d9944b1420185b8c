import pytest

from llmqtt.tasks import ClassifyTask, GenerateTask, TaskFileError, load_task_file, load_tasks, parse_task

BASE = {"kind": "classify", "system": "s", "labels": {"yes": "yes", "no": "no"}}


def test_shipped_prompts_load(repo_root):
    tasks = load_tasks([repo_root / "prompts"])
    assert {"sentiment", "chat"} <= set(tasks)
    assert isinstance(tasks["sentiment"], ClassifyTask) and set(tasks["sentiment"].labels) == {"positive", "negative"}
    assert isinstance(tasks["chat"], GenerateTask)
    assert sum(isinstance(t, ClassifyTask) for t in tasks.values()) >= 2
    assert sum(isinstance(t, GenerateTask) for t in tasks.values()) >= 2


def test_adding_a_task_is_adding_a_file(tmp_path):
    (tmp_path / "spam.yaml").write_text("kind: classify\nsystem: Spam or not?\nlabels: [spam, ham]\n")
    tasks = load_tasks([tmp_path])
    assert tasks["spam"].labels == {"spam": ["spam"], "ham": ["ham"]}


def test_later_directories_override_earlier(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "t.yaml").write_text("kind: generate\nsystem: first\n")
    (b / "t.yaml").write_text("kind: generate\nsystem: second\n")
    assert load_tasks([a, b])["t"].system.strip() == "second"


@pytest.mark.parametrize("data, field", [
    ({**BASE, "labels": {"yes": "yes"}}, "labels"),
    ({**BASE, "examples": [{"text": "x", "label": "maybe"}]}, "examples.0.label"),
    ({**BASE, "calibration": {"maybe": 1.0}}, "calibration.maybe"),
    ({**BASE, "user_template": "no slot"}, "user_template"),
    ({**BASE, "system": ""}, "system"),
    ({**BASE, "colour": "red"}, "colour"),
    ({"kind": "generate", "system": "s", "generation": {"temperature": -1}}, "generation.temperature"),
    ({"kind": "generate", "system": "s", "overrides": {"*": {"generation": {"top_p": 2}}}}, "overrides.*"),
    ({"kind": "generate", "system": "s", "overrides": {"*": {"kind": "classify"}}}, "overrides.*"),
])
def test_errors_name_the_field(data, field):
    with pytest.raises(TaskFileError) as err:
        parse_task(data, "prompts/x.yaml", "x")
    assert str(err.value).startswith("prompts/x.yaml: ")
    assert field in str(err.value)


def test_unknown_kind_and_bad_name():
    with pytest.raises(TaskFileError, match="kind"):
        parse_task({"kind": "chat", "system": "s"}, "f", "x")
    with pytest.raises(TaskFileError, match="name"):
        parse_task({**BASE, "name": "Bad Name!"}, "f", "x")


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: [unclosed\n")
    with pytest.raises(TaskFileError, match="broken.yaml"):
        load_task_file(path)


def test_overrides_merge_deeply_and_only_for_matching_models():
    task = parse_task({"kind": "generate", "system": "s", "generation": {"temperature": 0.3, "max_new_tokens": 50},
                       "overrides": {"*qwen*0.5b*": {"generation": {"max_new_tokens": 20}, "system": "small"}}},
                      "f", "t")
    small = task.for_model("Qwen2.5-Coder-0.5B-Instruct")
    assert small.generation.max_new_tokens == 20 and small.generation.temperature == 0.3 and small.system == "small"
    assert task.for_model("smollm2-135m").generation.max_new_tokens == 50


def test_user_template_keeps_braces_in_text():
    task = parse_task({**BASE, "user_template": "Text: {text}"}, "f", "t")
    assert task.render_user("a {b} c") == "Text: a {b} c"


def test_no_task_files_is_an_error(tmp_path):
    with pytest.raises(TaskFileError, match="no task files"):
        load_tasks([tmp_path])
    with pytest.raises(TaskFileError, match="does not exist"):
        load_tasks([tmp_path / "missing"])
