"""A private PostgreSQL server a fault test may stop, start and restart at will.

The session server of the pytest plugin is shared by every test, so tests that take
Postgres down use their own: an `EphemeralPostgres`, plus the ability to stop its
postmaster and start a new one on the same data directory and socket (what an
operator's `pg_ctl restart` does). Clients keep the same conninfo throughout, which is
the point: pools must find the server again by themselves.

Only the public surface of `EphemeralPostgres` is used (its data directory, socket and
log); the restarted postmaster is a child of ours, stopped in `close()` before the
ephemeral server removes its directory, and asks for SIGINT if the test process dies.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from typing import Any

import psycopg
from psycopg import sql

from substrate_db import Substrate
from substrate_db.testing import EphemeralPostgres

from . import _procs

READY_TIMEOUT = 30.0
"""Seconds a (re)started server gets to accept connections; failing that, the test fails."""


class ControlledPostgres:
    """An `EphemeralPostgres` whose server can be taken down and brought back."""

    def __init__(self, **options: Any) -> None:
        self.ephemeral = EphemeralPostgres(**options)
        self._argv: list[str] | None = None
        self._restarted: subprocess.Popen[bytes] | None = None

    def start(self) -> ControlledPostgres:
        self.ephemeral.start()
        # The exact command line the postmaster was started with (it writes it there
        # itself), so a restarted server has the same settings and socket.
        opts = (self.ephemeral.data_dir / "postmaster.opts").read_text()
        self._argv = shlex.split(opts)
        return self

    def conninfo_for(self, dbname: str) -> str:
        return self.ephemeral.conninfo_for(dbname)

    def create_database(self, name: str, *, migrate: bool = True) -> str:
        """CREATE DATABASE `name` (migrated by default); return its conninfo."""
        with psycopg.connect(self.ephemeral.conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        conninfo = self.conninfo_for(name)
        if migrate:
            with Substrate.connect(conninfo, min_size=0, max_size=1) as client:
                client.migrate()
        return conninfo

    def _postmaster_pid(self) -> int:
        # The first line of postmaster.pid is the running postmaster's pid, whichever
        # process started it (the ephemeral server or our restart).
        return int((self.ephemeral.data_dir / "postmaster.pid").read_text().split()[0])

    def stop_server(self, mode: str = "fast") -> None:
        """Shut the server down: `fast` (SIGINT: roll back, disconnect everyone, clean
        checkpoint) or `immediate` (SIGQUIT: a crash, recovered at the next start)."""
        sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        pidfile = self.ephemeral.data_dir / "postmaster.pid"
        pid = self._postmaster_pid()
        os.kill(pid, sig)
        deadline = time.monotonic() + READY_TIMEOUT
        # The postmaster removes its pid file as its very last step; after an immediate
        # shutdown it stays, so wait for the process instead.
        while time.monotonic() < deadline:
            if self._restarted is not None and self._restarted.poll() is not None:
                break
            if not pidfile.exists() or not _alive(pid):
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"postgres (pid {pid}) did not stop within {READY_TIMEOUT} s")
        if self._restarted is not None:
            self._restarted.wait(timeout=READY_TIMEOUT)
            self._restarted = None

    def start_server(self) -> None:
        """Start a postmaster again on the same data directory and socket; return once it
        accepts connections."""
        assert self._argv is not None, "start() first"
        pidfile = self.ephemeral.data_dir / "postmaster.pid"
        if pidfile.exists() and not _alive(int(pidfile.read_text().split()[0])):
            pidfile.unlink()  # left by an immediate shutdown; postgres would check it anyway
        self._restarted = _procs.spawn(
            self._argv,
            log=self.ephemeral.log_path,
            cwd=self.ephemeral.socket_dir,
            env={"LC_ALL": "C", "LANG": "C", "PATH": os.environ.get("PATH", "")},
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._restarted.poll() is not None:
                raise AssertionError(f"postgres exited on restart; see {self.ephemeral.log_path}")
            try:
                with psycopg.connect(self.ephemeral.conninfo, connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def restart(self, mode: str = "fast") -> None:
        self.stop_server(mode)
        self.start_server()

    def close(self) -> None:
        if self._restarted is not None:
            _procs.stop(self._restarted, signal.SIGINT)
            self._restarted = None
        self.ephemeral.stop()

    def __enter__(self) -> ControlledPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (a dead child of ours not yet reaped) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True
