"""The command line's own surface: --version, and help for every argument of every sub-command."""

from __future__ import annotations

import argparse

import pytest

from llmqtt import __version__
from llmqtt.cli import _parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"llmqtt {__version__}"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_argument_says_what_it_is(name):
    undocumented = [a.dest for a in subcommands()[name]._actions
                    if not isinstance(a, argparse._HelpAction) and not a.help]
    assert undocumented == []
