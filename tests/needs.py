"""One rule for tests that need something outside Python (a tool, an optional module)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(what: str) -> NoReturn:
    """CI installs everything and must run every test, so there a missing piece fails the run; elsewhere
    (a laptop without mosquitto, say) the test is skipped with the reason."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed, and CI must run this test")
    pytest.skip(f"{what} is not installed")
