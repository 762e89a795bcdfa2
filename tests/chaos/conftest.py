"""The chaos directory's tests: the `slow` marker (the soak) as in tests/reliability."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability import _slow


def pytest_configure(config: pytest.Config) -> None:
    _slow.register(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _slow.skip_unless_enabled(items, Path(__file__).parent)
