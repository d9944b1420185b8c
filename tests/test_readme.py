"""The README's two commands are the contract with a newcomer; CI must run the same test command."""

import re


def readme_commands(repo_root) -> list[str]:
    text = (repo_root / "README.md").read_text()
    block = re.search(r"<!-- two-commands -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md lost its two-commands block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_two_commands_and_ci_runs_the_test_one(repo_root):
    setup, tests = readme_commands(repo_root)
    ci = (repo_root / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci], f"CI does not run the README's test command {tests!r}"
    script = setup.split()[-1] if setup.startswith("bash ") else setup.split()[0]
    assert (repo_root / script.lstrip("./")).is_file(), setup
