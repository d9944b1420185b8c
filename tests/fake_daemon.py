"""Test-only entry point: the real `llmqtt` command line with the fake engine as its engine factory.

`python tests/fake_daemon.py run --config X` is `llmqtt run --config X` that goes through resolve, plan and
warm-up (build.build_engine) but loads `fake_engine.FakeEngine` instead of a model. The config's model must be
a directory with a config.json (fake_engine.write_model_dir).
"""

import sys

from fake_engine import load_engine

from llmqtt.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], engine_factory=load_engine))
