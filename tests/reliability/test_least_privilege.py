"""The least-privilege setup of docs/security.md, run as written, then probed.

The roles and grants are read from the page's SQL blocks (marked `<!-- test: ... -->`)
and executed on a private server (roles are cluster-wide, so not on the shared one).
The owner migrates; the worker then does everything a worker, an intake slot and a
lease-recovery owner do; and every destructive statement a worker might try is refused
with a privilege error, leaving the schema as it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from substrate_db import DatabaseError, JobState, SlotHeartbeat, SlotStatus, Substrate
from substrate_db.intake.idempotency import IdempotencyStore

from ._fingerprint import fingerprint
from ._servers import ControlledPostgres

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
OWNER_ONLY: set[str] = set()
"""Tables the worker gets no privilege on at all (none today: it reads schedules)."""


def doc_sql(marker: str) -> str:
    """The ```sql block that follows `<!-- test: marker -->` in docs/security.md."""
    text = DOC.read_text()
    match = re.search(rf"<!-- test: {marker} -->\s*```sql\n(.*?)```", text, re.S)
    assert match, f"docs/security.md has no sql block marked {marker!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def roles() -> Iterator[tuple[ControlledPostgres, str, str]]:
    """A server with database `app` set up as the page says: (server, owner dsn, worker dsn)."""
    server = ControlledPostgres().start()
    try:
        server.create_database("app", migrate=False)
        with psycopg.connect(server.conninfo_for("app"), autocommit=True) as admin:
            admin.execute(doc_sql("roles"))
        owner = server.conninfo_for("app").replace("user=postgres", "user=substrate_owner")
        worker = server.conninfo_for("app").replace("user=postgres", "user=substrate_worker")
        with Substrate.connect(owner, max_size=1) as client:
            assert client.migrate()  # the owner migrates from nothing
        with psycopg.connect(owner, autocommit=True) as conn:
            conn.execute(doc_sql("grants"))
            conn.execute(doc_sql("grants"))  # the page says they can be run again
        yield server, owner, worker
    finally:
        server.close()


def test_owner_owns_everything_in_the_schema(roles: tuple[ControlledPostgres, str, str]) -> None:
    _, owner, _ = roles
    with psycopg.connect(owner) as conn:
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c"
            " WHERE c.relnamespace = 'substrate'::regnamespace"
            " UNION SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'substrate'"
        ).fetchall()
    assert owners == [("substrate_owner",)]


def test_every_table_is_covered_by_the_grants(roles: tuple[ControlledPostgres, str, str]) -> None:
    """A migration that adds a table must extend the page's grants (or OWNER_ONLY)."""
    _, owner, _ = roles
    with psycopg.connect(owner) as conn:
        rows = conn.execute(
            "SELECT c.relname, has_table_privilege('substrate_worker', c.oid, 'SELECT')"
            " FROM pg_class c WHERE c.relnamespace = 'substrate'::regnamespace AND c.relkind = 'r'"
        ).fetchall()
    uncovered = sorted(name for name, can in rows if not can and name not in OWNER_ONLY)
    assert not uncovered, f"tables without worker grants in docs/security.md: {uncovered}"


def test_worker_can_do_a_workers_job(roles: tuple[ControlledPostgres, str, str]) -> None:
    _, _, worker = roles
    with Substrate.connect(worker, max_size=2) as client:
        far = datetime.now(UTC) + timedelta(days=1)
        ids = client.enqueue_many(
            [
                {"kind": "w", "payload": {"n": 1}, "serial_key": "s", "source_id": "src"},
                {"kind": "w", "dedupe_key": "d", "max_attempts": 1},
                {"kind": "w", "dedupe_key": "d"},  # folded into the previous one
            ]
        )
        assert ids[1] == ids[2]
        first = client.claim_next_job("slot-w", ["w"], lease_secs=30)
        assert first is not None and first.id == ids[0]
        assert client.extend_lease(first.id, first.claim_epoch, 60).ok
        assert client.complete_job(first.id, first.claim_epoch, {"ok": True}).ok
        outcome = client.wait_for_result(first.id, source_id="src", timeout=5)
        assert outcome is not None and outcome.result == {"ok": True}
        assert [o.job_id for o in client.fetch_results("src")] == [first.id]

        second = client.claim_next_job("slot-w", ["w"], lease_secs=30)
        assert second is not None
        assert client.fail_job(second.id, second.claim_epoch, "boom", retryable=False).ok

        third_id = client.enqueue("w")
        third = client.claim_next_job("slot-w", ["w"], lease_secs=1)
        assert third is not None and third.id == third_id
        recovered = client.release_expired_leases(now=far)
        assert recovered.requeued_ids == (third_id,)
        again = client.claim_next_job("slot-w", ["w"], lease_secs=1)
        assert again is not None and again.id == third_id
        assert client.release_expired_leases_exclusive(now=far + timedelta(hours=1)) is not None
        assert client.cancel_job(client.enqueue("w"))
        assert client.get_job(third_id) is not None and client.list_jobs(kind="w")
        assert [m.applied_at is not None for m in client.migration_status()]

        with client.pool.connection() as conn:
            store = IdempotencyStore()
            assert store.run_once(conn, "effect-1", lambda: 1) == 1
            assert store.run_once(conn, "effect-1", lambda: 2) == 1

        status = SlotStatus("slot-w", ["w"])
        heartbeat = SlotHeartbeat(client, status)
        heartbeat.beat()
        assert [s.slot_id for s in client.list_slots()] == ["slot-w"]
        assert client.get_job(ids[1]).state == JobState.FAILED  # type: ignore[union-attr]


REFUSED = [
    "DROP TABLE substrate.jobs",
    "DROP SCHEMA substrate CASCADE",
    "ALTER TABLE substrate.jobs ADD COLUMN evil int",
    "ALTER TABLE substrate.jobs DISABLE TRIGGER ALL",
    "TRUNCATE substrate.jobs",
    "DELETE FROM substrate.jobs",
    "DELETE FROM substrate.idempotency_keys",
    "CREATE TABLE substrate.evil (id int)",
    "CREATE INDEX evil ON substrate.jobs (kind)",
    "CREATE OR REPLACE FUNCTION substrate.free_serial_key() RETURNS trigger"
    " LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
    "INSERT INTO substrate.schema_migrations VALUES (999, 'evil', 'x')",
    "UPDATE substrate.schema_migrations SET checksum = 'x'",
    "INSERT INTO substrate.schedules (name, kind, interval_secs, next_run_at)"
    " VALUES ('evil', 'k', 1, now())",
    "UPDATE substrate.schedules SET enabled = false",
    "CREATE SCHEMA evil",
    "CREATE TABLE public.evil (id int)",
]


@pytest.mark.parametrize("statement", REFUSED)
def test_worker_cannot_change_the_schema_or_delete(
    roles: tuple[ControlledPostgres, str, str], statement: str
) -> None:
    _, owner, worker = roles
    with psycopg.connect(owner, autocommit=True) as check:
        before = fingerprint(check)
        with (
            psycopg.connect(worker, autocommit=True) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(statement)
        assert fingerprint(check) == before


def test_worker_cannot_migrate(roles: tuple[ControlledPostgres, str, str]) -> None:
    _, owner, worker = roles
    with psycopg.connect(owner, autocommit=True) as check:
        before = fingerprint(check)
        with (
            Substrate.connect(worker, max_size=1) as client,
            pytest.raises(DatabaseError) as caught,
        ):
            client.migrate()
        assert caught.value.sqlstate == "42501"  # insufficient_privilege
        assert fingerprint(check) == before


def test_owner_of_a_precreated_schema_needs_no_database_privilege() -> None:
    with ControlledPostgres() as server:
        server.create_database("app2", migrate=False)
        with psycopg.connect(server.conninfo_for("app2"), autocommit=True) as admin:
            admin.execute("CREATE ROLE schema_owner LOGIN")
            admin.execute("CREATE SCHEMA substrate AUTHORIZATION schema_owner")
        dsn = server.conninfo_for("app2").replace("user=postgres", "user=schema_owner")
        with Substrate.connect(dsn, max_size=1) as client:
            client.migrate()


def test_worker_cannot_grant_its_rights_away(roles: tuple[ControlledPostgres, str, str]) -> None:
    """A non-owner's GRANT only warns ("no privileges were granted"); the ACL is unchanged."""
    _, owner, worker = roles
    acl = "SELECT relacl::text FROM pg_class WHERE oid = 'substrate.jobs'::regclass"
    with psycopg.connect(owner, autocommit=True) as check:
        before = check.execute(acl).fetchone()
        with psycopg.connect(worker, autocommit=True) as conn:
            conn.execute("GRANT ALL ON substrate.jobs TO PUBLIC")
        assert check.execute(acl).fetchone() == before
