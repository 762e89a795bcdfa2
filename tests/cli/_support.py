"""Helpers shared by the CLI tests: one result shape for in-process and subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout as exactly one JSON document (json.loads refuses trailing data)."""
        return json.loads(self.out)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


Run = Callable[..., Ran]
Spawn = Callable[..., "subprocess.Popen[str]"]


def clean_env(home: Path) -> dict[str, str]:
    """The environment minus every way of naming a database, with a private
    SUBSTRATE_HOME so nothing reaches a real embedded server."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k not in ("SUBSTRATE_DSN", "SUBSTRATE_CONFIG")
    }
    env["SUBSTRATE_HOME"] = str(home)
    return env


def spawn(home: Path, *args: str, cwd: Path = HERE) -> subprocess.Popen[str]:
    """Start the CLI as a background process (for --every, workers, signals)."""
    return subprocess.Popen(
        [sys.executable, "-m", "substrate_db.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(home),
        cwd=cwd,
    )
