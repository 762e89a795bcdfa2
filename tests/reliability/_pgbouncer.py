"""PgBouncer in transaction pooling mode in front of a test server, for the tests.

Debian's `pgbouncer` (1.18 on bookworm) is installed with apt-get when it is missing and
we are root; otherwise the tests that need it are skipped with the reason. Facts this
relies on, checked by hand first: 1.18 has no prepared-statement support (1.21 added
it), so clients must not use server-side prepared statements (psycopg:
`prepare_threshold=None`, which `Substrate.connect(..., pgbouncer=True)` sets); it
refuses to run as root, so it runs as the test server's unprivileged account; and it
serves a unix socket with `pool_mode = transaction`.

PgBouncer listens on a unix socket only (no TCP), in a temp directory of its own, and
forwards every database name (`* =`) to the server, so the per-test databases of the
plugin are reachable through it without reconfiguring it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import _procs

PGBOUNCER_PORT = 6432
"""Names the socket file only (`.s.PGSQL.6432`): nothing listens on TCP."""
START_TIMEOUT = 20.0
_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


class PgBouncerUnavailable(Exception):
    """PgBouncer is not installed and cannot be installed here; the message says why."""


def find_or_install() -> str:
    """The pgbouncer binary; installs Debian's package when missing and we are root."""
    found = shutil.which("pgbouncer") or next((p for p in _CANDIDATES if Path(p).exists()), None)
    if found:
        return found
    if os.geteuid() != 0:
        raise PgBouncerUnavailable("pgbouncer is not installed (as root the tests install it)")
    if shutil.which("apt-get") is None:
        raise PgBouncerUnavailable("pgbouncer is not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "pgbouncer"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = " ".join(result.stderr.split()[-30:])
        raise PgBouncerUnavailable(f"apt-get install pgbouncer failed: {tail}")
    found = shutil.which("pgbouncer") or next((p for p in _CANDIDATES if Path(p).exists()), None)
    if not found:
        raise PgBouncerUnavailable("pgbouncer was installed but its binary was not found")
    _stop_packaged_service()
    return found


def _stop_packaged_service() -> None:
    # The package may have started its own pgbouncer (port 6432 on localhost) where an
    # init system exists; it is not ours to keep running.
    if shutil.which("service"):
        subprocess.run(["service", "pgbouncer", "stop"], capture_output=True, check=False)


class PgBouncer:
    """A PgBouncer (transaction pooling) in front of the server at `server_conninfo`."""

    def __init__(self, server_conninfo: str, *, pool_size: int = 20) -> None:
        self.server = conninfo_to_dict(server_conninfo)
        self.pool_size = pool_size
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        binary = find_or_install()
        self.dir = Path(tempfile.mkdtemp(prefix="substrate-pgb-", dir="/tmp"))
        # Readable and writable by the account it runs as: config, log, socket.
        _procs.give_to_account(self.dir)
        host = str(self.server.get("host") or "/tmp")
        port = str(self.server.get("port") or 5432)
        user = str(self.server.get("user") or "postgres")
        password = str(self.server.get("password") or "")
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={host} port={port}",
                    "[pgbouncer]",
                    # No listen_addr: unix socket only.
                    f"unix_socket_dir = {self.dir}",
                    f"listen_port = {PGBOUNCER_PORT}",
                    "pool_mode = transaction",
                    # trust on our private socket; the server login uses auth_file's entry.
                    "auth_type = trust",
                    f"auth_file = {self.dir / 'userlist.txt'}",
                    f"default_pool_size = {self.pool_size}",
                    "max_client_conn = 1000",
                    f"logfile = {self.dir / 'pgbouncer.log'}",
                    "log_connections = 0",
                    "log_disconnections = 0",
                    f"admin_users = {user}",
                    "",
                ]
            )
        )
        userlist = self.dir / "userlist.txt"
        # Every role the tests use through PgBouncer (least-privilege roles included).
        users = [user, "substrate_owner", "substrate_worker"]
        userlist.write_text("".join(f'"{u}" "{password if u == user else ""}"\n' for u in users))
        for path in (ini, userlist):
            _procs.give_to_account(path)
            path.chmod(0o600)
        self._proc = _procs.spawn(
            [binary, str(ini)], log=self.dir / "pgbouncer.out", cwd=self.dir, env={}
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None and self.dir is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start: {self.log_tail()}")
            try:
                with psycopg.connect(self.conninfo_for("postgres"), prepare_threshold=None) as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer not ready: {self.log_tail()}") from None
                time.sleep(0.05)

    def log_tail(self) -> str:
        assert self.dir is not None
        text = ""
        for name in ("pgbouncer.out", "pgbouncer.log"):
            path = self.dir / name
            if path.exists():
                text += path.read_text(errors="replace")
        return " | ".join(text.splitlines()[-15:])

    def conninfo_for(self, dbname: str, **extra: str) -> str:
        """The conninfo of database `dbname` through PgBouncer."""
        assert self.dir is not None
        params = {"user": str(self.server.get("user") or "postgres")} | extra
        return make_conninfo("", host=str(self.dir), port=PGBOUNCER_PORT, dbname=dbname, **params)

    def through(self, server_conninfo: str, **extra: str) -> str:
        """The PgBouncer conninfo of the database named in `server_conninfo`."""
        return self.conninfo_for(str(conninfo_to_dict(server_conninfo)["dbname"]), **extra)

    def stop(self) -> None:
        if self._proc is not None:
            _procs.stop(self._proc)  # SIGTERM: immediate shutdown
            self._proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
