"""The `slow` marker: tests that run only with SUBSTRATE_SLOW_TESTS=1.

Shared by the conftests of tests/reliability and tests/chaos, each applying it to its
own directory's tests, so the default run stays within the CI budget.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SLOW_ENV = "SUBSTRATE_SLOW_TESTS"


def register(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"slow: runs only with {SLOW_ENV}=1")


def skip_unless_enabled(items: list[pytest.Item], directory: Path) -> None:
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow: set {SLOW_ENV}=1 to run")
    for item in items:
        if "slow" in item.keywords and directory in item.path.parents:
            item.add_marker(skip)
