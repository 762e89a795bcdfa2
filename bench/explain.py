"""Where the time goes: EXPLAIN (ANALYZE, BUFFERS) of the hot statements.

The library's own claim and complete run for real inside a transaction that is rolled
back, on whatever table the caller prepared (a backlog, a history), so the plans are
the ones the bench measured.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from substrate_db._queries import rendered_queries

from .env import KIND, Env

PARAMS: dict[str, Any] = {"kinds": [KIND], "slot_id": "explain", "lease_secs": 300, "now": None}


def _explain(cur: psycopg.Cursor[dict[str, Any]], sql: str, params: dict[str, Any]) -> str:
    cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, params)
    return "\n".join(str(row["QUERY PLAN"]) for row in cur.fetchall())


def hot_path_plans(env: Env, schema: str, *, limit: int) -> dict[str, str]:
    """Plans of claim (`limit` jobs) and of completing what it claimed."""
    q = rendered_queries(schema)
    plans: dict[str, str] = {}
    with (
        env.admin() as conn,
        conn.transaction(force_rollback=True),
        conn.cursor(row_factory=dict_row) as cur,
    ):
        plans[f"claim_jobs limit {limit}"] = _explain(
            cur, q["claim_jobs"].sql, {**PARAMS, "limit": limit}
        )
        cur.execute(q["claim_jobs"].sql, {**PARAMS, "limit": limit})
        claimed = sorted((row["id"], row["claim_epoch"]) for row in cur.fetchall())
        plans[f"complete_jobs x{len(claimed)}"] = _explain(
            cur,
            q["complete_jobs"].sql,
            {
                "ids": [c[0] for c in claimed],
                "epochs": [c[1] for c in claimed],
                "results": [None] * len(claimed),
                "now": None,
            },
        )
    return plans
