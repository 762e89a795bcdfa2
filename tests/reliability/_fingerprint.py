"""A fingerprint of everything a call could have changed in a substrate schema.

Tests that must prove "the database is unchanged" compare fingerprints before and after:
every row of every table in the schema (as text, in a stable order), the jobs id
sequence (a rolled-back insert still advances it, so a call that reached the database
and failed there would show), and the list of relations in the schema.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

TABLES = ("jobs", "serial_keys", "idempotency_keys", "schedules", "slots", "schema_migrations")


def fingerprint(conn: Any, schema: str = "substrate") -> tuple[Any, ...]:
    parts: list[Any] = []
    for table in TABLES:
        query = sql.SQL(
            "SELECT coalesce(string_agg(t::text, '|' ORDER BY t::text), '') FROM {}.{} t"
        )
        row = conn.execute(query.format(sql.Identifier(schema), sql.Identifier(table))).fetchone()
        parts.append(row[0])
    seq = sql.SQL("SELECT last_value, is_called FROM {}.jobs_id_seq").format(sql.Identifier(schema))
    parts.append(tuple(conn.execute(seq).fetchone()))
    relations = conn.execute(
        "SELECT string_agg(c.relname || ':' || c.relkind::text, ',' ORDER BY c.relname)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s",
        [schema],
    ).fetchone()
    parts.append(relations[0])
    return tuple(parts)
