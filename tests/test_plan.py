"""The claim reads available rows through the partial index, whatever the table holds.

The claim is the hot path: its cost must follow the rows it takes, not the history and
not the size of the backlog. These tests run the library's own `claim_jobs` statement
under EXPLAIN ANALYZE (in a transaction rolled back afterwards), as a prepared statement
runs it: its first executions (custom plans), and the sixth, when Postgres chooses
between a custom and the generic plan (psycopg prepares a statement on its fifth run),
over two tables:

- a long history of finished jobs and a small backlog: the finished rows must stay out
  of the claim's way (they are not in the partial index `jobs_claim_idx`);
- a large backlog: the claim must take the head of the queue from an index in claim
  order and stop, not read and sort every available row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from substrate_db import Substrate
from substrate_db._queries import rendered_queries

_PARAM = re.compile(r"%\((\w+)\)[sb]")

LIMIT = 10
CLAIM_ARGS: dict[str, Any] = {
    "kinds": ["work"],
    "limit": LIMIT,
    "slot_id": "plan-test",
    "lease_secs": 300,
    "now": None,
}


def _prepared(sql: str) -> tuple[str, list[str]]:
    """psycopg's %(name)s placeholders as $n, for PREPARE; and the names in $n order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return _PARAM.sub(number, sql).replace("%%", "%"), names


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def _claim_plan(conn: psycopg.Connection[Any], schema: str, mode: str) -> list[dict[str, Any]]:
    """Every node of the executed claim's plan (the claim's effects are rolled back)."""
    sql, names = _prepared(rendered_queries(schema)["claim_jobs"].sql.rstrip().rstrip(";"))
    # A client-side cursor speaks the simple query protocol: over the extended one, the
    # server would take the $n in the PREPARE text, and EXECUTE's arguments, for
    # parameters of the outer statement, of unknown type.
    cur = psycopg.ClientCursor(conn)
    with conn.transaction(force_rollback=True):
        cur.execute(f"SET LOCAL plan_cache_mode = {mode}")
        cur.execute(f"PREPARE claim_plan AS {sql}")
        args = ", ".join(["%s"] * len(names))
        if mode == "auto":
            # Five runs give the plan cache the custom plans it compares the generic to.
            for _ in range(5):
                cur.execute(f"EXECUTE claim_plan({args})", [CLAIM_ARGS[n] for n in names])
        cur.execute(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim_plan({args})",
            [CLAIM_ARGS[n] for n in names],
        )
        row = cur.fetchone()
    conn.execute("DEALLOCATE claim_plan")
    assert row is not None
    plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
    return list(_walk(plan[0]["Plan"]))


def _partial_indexes(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    """Indexes of the jobs table whose predicate keeps only available rows."""
    rows = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'jobs'",
        [schema],
    ).fetchall()
    return {name for name, definition in rows if "WHERE (state = 'available'::text)" in definition}


def _fill(conn: psycopg.Connection[Any], schema: str, *, finished: int, available: int) -> None:
    jobs = f'"{schema}".jobs'
    conn.execute(
        f"INSERT INTO {jobs} (kind, state, attempts, claim_epoch, finished_at) "
        "SELECT 'work', 'completed', 1, 1, now() FROM generate_series(1, %s)",
        [finished],
    )
    conn.execute(
        f"INSERT INTO {jobs} (kind, payload) "
        "SELECT 'work', jsonb_build_object('n', g) FROM generate_series(1, %s) g",
        [available],
    )
    conn.execute(f"VACUUM (ANALYZE) {jobs}")


def _candidate_scans(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scans of the jobs table that look for claimable rows: every scan of jobs except
    the UPDATE's lookups by primary key (the serial-key checks run inside functions and
    do not show in the claim's plan)."""
    return [
        n
        for n in nodes
        if n.get("Relation Name") == "jobs"
        and "Scan" in n["Node Type"]
        and n.get("Index Name") != "jobs_pkey"
    ]


def _indexes_read(scan: dict[str, Any]) -> set[str]:
    """Index names a scan uses, a bitmap heap scan's bitmap index scans included."""
    return {n["Index Name"] for n in _walk(scan) if "Index Name" in n}


def _rows_read(scan: dict[str, Any]) -> float:
    return float(scan["Actual Rows"]) * float(scan["Actual Loops"])


def _checked_claim_plan(
    conn: psycopg.Connection[Any], schema: str, mode: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], set[str]]:
    """The claim's plan nodes, its candidate scans and the partial indexes, after the
    checks every plan must pass. Nowhere a whole-table read: a generic plan, say, that
    hash-joins the picked ids against a seq scan of jobs would cost as much as the
    backlog on every claim."""
    nodes = _claim_plan(conn, schema, mode)
    assert not [
        n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"
    ]
    scans = _candidate_scans(nodes)
    assert scans, "the claim plan has no scan of the jobs table"
    return nodes, scans, _partial_indexes(conn, schema)


@pytest.fixture
def admin(substrate: Substrate, substrate_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("mode", ["force_custom_plan", "auto"])
def test_claim_skips_finished_history(
    substrate: Substrate, admin: psycopg.Connection[Any], mode: str
) -> None:
    _fill(admin, substrate.schema, finished=50_000, available=200)
    _, scans, partial = _checked_claim_plan(admin, substrate.schema, mode)
    assert "jobs_claim_idx" in partial
    for scan in scans:
        assert _indexes_read(scan) & partial, f"not through a partial index: {scan}"
        # Finished rows are not in the index, so none of them is even looked at.
        assert _rows_read(scan) <= 200, scan


@pytest.mark.parametrize("mode", ["force_custom_plan", "auto"])
def test_claim_takes_the_head_of_a_large_backlog_from_an_index(
    substrate: Substrate, admin: psycopg.Connection[Any], mode: str
) -> None:
    _fill(admin, substrate.schema, finished=0, available=50_000)
    nodes, scans, partial = _checked_claim_plan(admin, substrate.schema, mode)
    for scan in scans:
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), scan
        assert _indexes_read(scan) & partial, f"not through a partial index: {scan}"
        # In claim order from the index: the scan stops after LIMIT rows; reading the
        # backlog and sorting it would read all 50,000.
        assert _rows_read(scan) <= 2 * LIMIT, scan
    # The UPDATE finds its rows by primary key among the candidates: take_serial_key, in
    # its WHERE clause, must never run for a row the claim did not pick.
    updates = [n for n in nodes if n["Node Type"] == "ModifyTable"]
    assert len(updates) == 1
    (source,) = [n for n in updates[0]["Plans"] if n["Parent Relationship"] == "Outer"]
    targets = [n for n in _walk(source) if n.get("Relation Name") == "jobs"]
    assert [n.get("Index Name") for n in targets] == ["jobs_pkey"], targets


def test_the_dedupe_index_leaves_out_jobs_without_a_key(
    substrate: Substrate, admin: psycopg.Connection[Any]
) -> None:
    """A btree indexes NULLs: without the predicate every job would take a dedupe index
    entry at enqueue and again at claim (migration 0007)."""
    row = admin.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = 'jobs_dedupe_idx'",
        [substrate.schema],
    ).fetchone()
    assert row is not None and "dedupe_key IS NOT NULL" in row[0], row
    first = substrate.enqueue("k", dedupe_key="once")
    assert substrate.enqueue("k", dedupe_key="once") == first
    assert len({substrate.enqueue("k") for _ in range(3)}) == 3
