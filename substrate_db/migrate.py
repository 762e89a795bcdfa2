"""The migration runner: applies `sql/migrations/NNNN_name.sql` in order, safely.

Each pending migration runs in its own transaction, under a transaction-scoped advisory
lock keyed by the schema name, so two processes migrating at once take turns and the
second finds nothing left to do. Applied versions are recorded with the SHA-256 of the
file; an applied file that changed since is refused, because a schema that silently
differs from its history is worse than a failed deploy. Like every operation here, the
runner is a plan (see `core`), driven by the sync or async client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._queries import Migration, Rendered, render
from .core import BEGIN, COMMIT, Plan, Stmt
from .errors import MigrationChecksumMismatch
from .models import MigrationStatus


def _verify(applied: Sequence[Mapping[str, Any]], known: Sequence[Migration]) -> set[int]:
    by_version = {m.version: m for m in known}
    for row in applied:
        migration = by_version.get(row["version"])
        if migration is not None and migration.checksum != row["checksum"]:
            raise MigrationChecksumMismatch(
                f"migration {row['version']:04d}_{row['name']} was changed after it was applied "
                f"(recorded checksum {row['checksum'][:12]}…, "
                f"file now {migration.checksum[:12]}…); "
                "migrations are append-only: restore the file and add a new migration instead"
            )
    return {int(row["version"]) for row in applied}


def migrate_plan(
    q: Mapping[str, Rendered], schema: str, migrations: Sequence[Migration]
) -> Plan[list[int]]:
    """Apply every pending migration; return the versions applied by this call."""
    applied_now: list[int] = []
    while True:
        yield BEGIN
        yield Stmt(q["migrate_lock"], {"schema": schema})
        yield Stmt(q["migrate_bootstrap"])
        rows = yield Stmt(q["migrations_applied"])
        done = _verify(rows, migrations)
        pending = [m for m in migrations if m.version not in done]
        if not pending:
            yield COMMIT
            return applied_now
        migration = pending[0]
        yield Stmt(
            Rendered(f"migration {migration.version:04d}", "exec", render(migration.text, schema))
        )
        yield Stmt(
            q["migration_record"],
            {"version": migration.version, "name": migration.name, "checksum": migration.checksum},
        )
        yield COMMIT
        applied_now.append(migration.version)


def status_plan(
    q: Mapping[str, Rendered], schema: str, migrations: Sequence[Migration]
) -> Plan[list[MigrationStatus]]:
    """Every known migration with its applied time (None when pending). Creates nothing."""
    exists = yield Stmt(q["migrations_table_exists"], {"table": f'"{schema}".schema_migrations'})
    rows: list[Mapping[str, Any]] = []
    if exists["present"]:
        rows = yield Stmt(q["migrations_applied"])
    _verify(rows, migrations)
    applied = {row["version"]: row["applied_at"] for row in rows}
    return [
        MigrationStatus(version=m.version, name=m.name, applied_at=applied.get(m.version))
        for m in migrations
    ]
