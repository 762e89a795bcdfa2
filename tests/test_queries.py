"""The named queries: the loader, and the places where two statements must agree."""

from __future__ import annotations

import re

import pytest

from substrate_db._queries import load_migrations, load_queries, parse_queries, sql_dir


def test_every_query_has_a_known_result_shape() -> None:
    queries = load_queries()
    assert {"claim_jobs", "claim_serial_jobs", "complete_jobs", "enqueue_jobs"} <= set(queries)
    assert all(q.returns in ("one", "many", "exec") for q in queries.values())
    assert [m.version for m in load_migrations()] == sorted(m.version for m in load_migrations())
    assert (sql_dir() / "queries.sql").is_file()


def test_parse_refuses_duplicates_and_empty_queries() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: a :one\nSELECT 1;\n-- name: a :one\nSELECT 2;\n")
    with pytest.raises(ValueError, match="no SQL"):
        parse_queries("-- name: a :one\n-- only a doc line\n")
    with pytest.raises(ValueError, match="header"):
        parse_queries("SELECT 1;")


def _claim_update(text: str) -> str:
    match = re.search(
        r"UPDATE \{schema\}\.jobs j\s+SET state = 'running',.*?RETURNING .*?\)", text, re.S
    )
    assert match is not None
    update = match.group(0)
    # The WHERE line names each statement's own candidates; everything else must agree.
    return re.sub(
        r"\n\s*(--[^\n]*\n\s*)*WHERE j\.id = ANY\(ARRAY\(.*?\)\)\)?\n", "\n", update, flags=re.S
    )


def test_both_claim_statements_claim_the_same_way() -> None:
    """claim_jobs (keyless jobs) and claim_serial_jobs (keyed ones) each UPDATE a job to
    running; the epoch, attempts, lease and returned columns must be written alike."""
    queries = load_queries()
    assert _claim_update(queries["claim_jobs"].text) == _claim_update(
        queries["claim_serial_jobs"].text
    )
