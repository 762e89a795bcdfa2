"""The named queries and migrations as the loader reads them."""

from __future__ import annotations

import pytest

from substrate_db._queries import load_migrations, load_queries, parse_queries, sql_dir


def test_every_query_has_a_known_result_shape() -> None:
    queries = load_queries()
    assert {"claim_jobs", "complete_jobs", "enqueue_jobs"} <= set(queries)
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
