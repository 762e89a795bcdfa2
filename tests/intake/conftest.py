"""Fixtures of the intake tests: configs pointing at the test database, a local queue,
intakes closed after each test, and a second server that checks passwords."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from substrate_db import Substrate
from substrate_db.intake import SQLiteTaskQueue, SubstrateConfig, SubstrateIntake

INTAKE_ROLE = "intake_slot"


def config_for(dsn: str, **overrides: Any) -> SubstrateConfig:
    """An enabled config reaching the database of `dsn` (a key=value conninfo)."""
    params = conninfo_to_dict(dsn)
    fields: dict[str, Any] = {
        "enabled": True,
        "credential": "test-db",
        "kinds": ["email"],
        "slot_id": "slot-a",
        "host": params["host"],
        "port": int(str(params.get("port", 5432))),
        "database": params["dbname"],
        "user": params.get("user"),
        "connect_timeout": 2.0,
    }
    fields.update(overrides)
    return SubstrateConfig.model_validate(fields)


def no_password(credential_id: str) -> None:
    """A resolver for the trust-authenticated test server: libpq needs no password."""
    return None


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SQLiteTaskQueue]:
    with SQLiteTaskQueue(tmp_path / "local.db") as q:
        yield q


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of the `substrate_db` logger, DEBUG and up."""
    caplog.set_level(logging.DEBUG, logger="substrate_db")
    return caplog


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of every logger, DEBUG and up. The loggers that matter here get
    their level set explicitly: other code (the CLI's tests) may have left one raised."""
    for name in (None, "substrate_db", "psycopg", "psycopg.pool"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    """The `[substrate]` lines logged at `level` or above."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "substrate_db" and r.levelno >= level and r.getMessage().startswith("[")
    ]


MakeIntake = Callable[..., SubstrateIntake]


@pytest.fixture
def make_intake(
    substrate_dsn: str, queue: SQLiteTaskQueue
) -> Iterator[Callable[..., SubstrateIntake]]:
    """Build intakes on this test's database (trust auth); all are closed afterwards."""
    made: list[SubstrateIntake] = []

    def make(
        *,
        local_queue: Any = None,
        resolve_credential: Any = no_password,
        clock: Callable[[], float] = time.monotonic,
        **overrides: Any,
    ) -> SubstrateIntake:
        intake = SubstrateIntake(
            config_for(substrate_dsn, **overrides),
            queue if local_queue is None else local_queue,
            resolve_credential=resolve_credential,
            clock=clock,
        )
        made.append(intake)
        return intake

    yield make
    for intake in made:
        intake.close()


@pytest.fixture
def dead_host(tmp_path: Path) -> str:
    """A unix socket directory with no server in it: connections fail at once."""
    path = tmp_path / "no-server"
    path.mkdir()
    return str(path)


@pytest.fixture
def hanging_host() -> Iterator[str]:
    """A unix socket directory whose 'server' accepts connections into its backlog and
    never answers: libpq waits for its startup reply until connect_timeout."""
    directory = tempfile.mkdtemp(prefix="sdb-hang-", dir="/tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(directory, ".s.PGSQL.5432"))
    listener.listen(16)
    try:
        yield directory
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- a server that checks passwords --------------------------------------------------


@dataclass
class PasswordServer:
    """A migrated database on a server where every role but `postgres` needs a password."""

    host: str
    port: int
    dbname: str
    admin_conninfo: str
    """postgres (trusted) on the same database, to rotate passwords and inspect rows."""

    def set_password(self, password: str) -> None:
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    psycopg.sql.Identifier(INTAKE_ROLE), psycopg.sql.Literal(password)
                )
            )

    def config(self, **overrides: Any) -> SubstrateConfig:
        fields: dict[str, Any] = {
            "enabled": True,
            "credential": "pw-slot",
            "kinds": ["email"],
            "slot_id": "slot-pw",
            "host": self.host,
            "port": self.port,
            "database": self.dbname,
            "user": INTAKE_ROLE,
            "connect_timeout": 2.0,
        }
        fields.update(overrides)
        return SubstrateConfig.model_validate(fields)


@pytest.fixture(scope="session")
def password_server() -> Iterator[PasswordServer]:
    """A private server whose pg_hba trusts only `postgres` and asks every other role
    for a SCRAM password, with a migrated database and the role `intake_slot`."""
    from substrate_db.testing import EphemeralPostgres, PostgresNotFound

    hba_dir = tempfile.mkdtemp(prefix="sdb-hba-")
    os.chmod(hba_dir, 0o755)  # the server may run as another account
    hba = Path(hba_dir) / "pg_hba.conf"
    hba.write_text("local all postgres trust\nlocal all all scram-sha-256\n")
    hba.chmod(0o644)
    try:
        server = EphemeralPostgres(settings={"hba_file": str(hba)}).start()
    except PostgresNotFound as exc:
        shutil.rmtree(hba_dir, ignore_errors=True)
        pytest.skip(f"no PostgreSQL binaries for a password-checking server: {exc}")
    try:
        with psycopg.connect(server.conninfo, autocommit=True) as conn:
            conn.execute("CREATE DATABASE intake_pw")
            conn.execute(f"CREATE ROLE {INTAKE_ROLE} LOGIN PASSWORD 'initial-pw'")
        admin = server.conninfo_for("intake_pw")
        with Substrate.connect(admin, min_size=1, max_size=1) as client:
            client.migrate()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"GRANT USAGE ON SCHEMA substrate TO {INTAKE_ROLE}")
            conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA substrate TO {INTAKE_ROLE}")
            conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA substrate TO {INTAKE_ROLE}")
        yield PasswordServer(str(server.socket_dir), server.port, "intake_pw", admin)
    finally:
        server.stop()
        shutil.rmtree(hba_dir, ignore_errors=True)


@pytest.fixture
def pw_admin(password_server: PasswordServer) -> Iterator[Substrate]:
    """A Substrate on the password server as `postgres`, with the jobs table emptied."""
    with Substrate.connect(password_server.admin_conninfo) as client:
        with client.pool.connection() as conn:
            conn.execute("TRUNCATE substrate.jobs")
        password_server.set_password("initial-pw")
        yield client
