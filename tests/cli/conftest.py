"""Fixtures for the CLI tests: run a command in-process (click's runner) or as a real
`python -m substrate_db.cli` subprocess, with the same result shape."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from substrate_db.cli import cli
from substrate_db.embedded import EmbeddedServer

from ._support import HERE, Ran, Run, clean_env, spawn


@pytest.fixture
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # /tmp, not pytest's deeper tmp_path: the embedded server's socket path must stay short.
    home = Path(tempfile.mkdtemp(prefix="sdb-home-", dir="/tmp"))
    os.chmod(home, 0o755)
    yield home
    EmbeddedServer(home).stop()  # a test that started one never leaves it running
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def run_inproc(cli_home: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """Run the CLI through click's test runner."""
    for key in list(os.environ):
        if key.startswith("PG") or key in ("SUBSTRATE_DSN", "SUBSTRATE_CONFIG"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SUBSTRATE_HOME", str(cli_home))

    def run(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Ran:
        result = CliRunner().invoke(cli, list(args), env=env, input=input, prog_name="substrate-db")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Ran(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def run_proc(cli_home: Path) -> Run:
    """Run the CLI as a real process: `python -m substrate_db.cli ...`."""

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        input: str | None = None,
        cwd: Path | None = None,
        timeout: float = 120,
    ) -> Ran:
        done = subprocess.run(
            [sys.executable, "-m", "substrate_db.cli", *args],
            capture_output=True,
            text=True,
            input=input,
            env={**clean_env(cli_home), **(env or {})},
            cwd=cwd or HERE,
            timeout=timeout,
            check=False,
        )
        return Ran(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture(params=["runner", "process"])
def run(request: pytest.FixtureRequest) -> Run:
    """The CLI both ways: every test using it runs once in-process, once as a process."""
    fixture: Run = request.getfixturevalue(
        "run_inproc" if request.param == "runner" else "run_proc"
    )
    return fixture


@pytest.fixture
def spawn_cli(cli_home: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start the CLI in the background (for --every, workers, signals); whatever is still
    running when the test ends (a failed assertion) is killed, never left behind."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = spawn(cli_home, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
