"""Fixtures of the reliability tests: PgBouncer, a private server to break, a frozen
database for bad-input tests, and the `slow` marker (SUBSTRATE_SLOW_TESTS=1 runs them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from substrate_db import Substrate

from . import _slow
from ._fingerprint import fingerprint
from ._pgbouncer import PgBouncer, PgBouncerUnavailable
from ._servers import ControlledPostgres


def pytest_configure(config: pytest.Config) -> None:
    _slow.register(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _slow.skip_unless_enabled(items, Path(__file__).parent)


@pytest.fixture(scope="session")
def pgbouncer(substrate_postgres: object) -> Iterator[PgBouncer]:
    """PgBouncer (transaction pooling) in front of the session's server; skipped, with
    the reason, where it is neither installed nor installable."""
    bouncer = PgBouncer(substrate_postgres.conninfo)  # type: ignore[attr-defined]
    try:
        bouncer.start()
    except PgBouncerUnavailable as exc:
        pytest.skip(f"PgBouncer unavailable: {exc}")
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pgbouncer_dsn(pgbouncer: PgBouncer, substrate_dsn: str) -> str:
    """This test's fresh database, through PgBouncer."""
    return pgbouncer.through(substrate_dsn)


@pytest.fixture
def own_postgres() -> Iterator[ControlledPostgres]:
    """A private server this test may stop, start and restart (never the shared one)."""
    server = ControlledPostgres().start()
    try:
        yield server
    finally:
        server.close()


@dataclass(frozen=True)
class Seeded:
    """A database holding a running job and an available one, and its fingerprint."""

    dsn: str
    client: Substrate
    check_conn: psycopg.Connection[Any]
    running_id: int
    running_epoch: int
    available_id: int
    before: tuple[Any, ...]


@pytest.fixture(scope="module")
def seeded(substrate_postgres: Any, substrate_template_db: str) -> Iterator[Seeded]:
    """One database per module, for tests that must leave it unchanged (which they
    check against `before`), so they can share it."""
    name = f"seeded_{os.getpid()}_{id(object())}"
    dsn = substrate_postgres.create_database(name, template=substrate_template_db)
    try:
        with (
            Substrate.connect(dsn, max_size=2) as client,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            running_id = client.enqueue("work", {"n": 1}, serial_key="s", dedupe_key="d")
            available_id = client.enqueue("work", {"n": 2}, source_id="src")
            job = client.claim_next_job("slot", ["work"], lease_secs=600)
            assert job is not None and job.id == running_id
            before = fingerprint(conn)
            yield Seeded(dsn, client, conn, job.id, job.claim_epoch, available_id, before)
    finally:
        substrate_postgres.drop_database(name)
