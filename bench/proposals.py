"""`python -m bench.proposals`: the hot-path changes proposed for the library, measured.

Not part of `make bench`: these are statements the library does not run (yet). Each
`bench/pgbench/proposal_*.sql` is driven by pgbench exactly like the ceiling script
`claim_complete.sql` (the library's own statements), interleaved run by run on the same
backlog, vacuumed before each run; plus the planning and execution time of each claim
form under a prepared statement, custom and generic plans.

Usage: python -m bench.proposals [--dsn CONNINFO] [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from substrate_db import Substrate
from substrate_db.testing._server import EphemeralPostgres, find_pg_bindir

from . import ceiling
from .env import KIND, MAIN_SCHEMA, SERVER_SETTINGS, Env, Sizes, available, reset, top_up, vacuum
from .stats import Figure, fmt

SCRIPTS = {
    "library (claim_complete.sql)": "claim_complete",
    "plain claim": "proposal_claim_plain",
    "plain complete": "proposal_complete_plain",
    "both": "proposal_both",
}
SHAPES = ((1, 4), (50, 2))
"""(batch, clients): one at a time with 4 clients, and batches of 50 with 2 (a worker's
claim and write-back connections)."""
BACKLOG = 100_000


def pgbench_rate(env: Env, script: str, *, batch: int, clients: int) -> tuple[float, float]:
    """(jobs/s, mean claim ms) of one pgbench run of `script`."""
    before = available(env)
    result = ceiling.run_pgbench(
        env.pgbench,
        env.conninfo,
        ceiling.render_script(script, MAIN_SCHEMA),
        clients=clients,
        seconds=env.sizes.seconds,
        variables={"kinds": "{" + KIND + "}", "batch": str(batch), "lease": "300"},
        workdir=env.workdir,
        tag=f"{script}_{batch}",
    )
    jobs = before - available(env)
    return jobs / result.seconds, result.statement_ms[0] if result.statement_ms else float("nan")


def _prepared_timing(conn: psycopg.Connection[Any], sql: str, mode: str, calls: int) -> float:
    """Mean ms per EXECUTE of a claim statement (LIMIT 1) prepared with `$n` params,
    inside a rolled-back transaction, after five warm-up executions."""
    cur = psycopg.ClientCursor(conn)
    with conn.transaction(force_rollback=True):
        cur.execute(f"SET LOCAL plan_cache_mode = {mode}")
        cur.execute(f"PREPARE p AS {sql}")
        for _ in range(5):
            cur.execute("EXECUTE p('{" + KIND + "}', 1, 'x', 300)")
        began = time.perf_counter()
        for _ in range(calls):
            cur.execute("EXECUTE p('{" + KIND + "}', 1, 'x', 300)")
        elapsed = time.perf_counter() - began
    conn.execute("DEALLOCATE p")
    return elapsed / calls * 1000


def generic_plan_table(env: Env, calls: int = 300) -> list[tuple[str, str, float]]:
    """The plain claim with its UPDATE matched by a join or by `= ANY(ARRAY(...))`, under
    custom plans (auto: re-planned on every call) and a forced generic plan."""
    picked = f"""
WITH picked AS MATERIALIZED (
    SELECT c.id FROM unnest($1::text[]) AS k (kind)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at FROM "{MAIN_SCHEMA}".jobs j
        WHERE j.state = 'available' AND j.kind = k.kind AND j.run_at <= now()
        ORDER BY j.priority, j.run_at, j.id LIMIT $2 FOR UPDATE OF j SKIP LOCKED) AS c
    ORDER BY c.priority, c.run_at, c.id LIMIT $2)
UPDATE "{MAIN_SCHEMA}".jobs j
SET state = 'running', claim_epoch = j.claim_epoch + 1, attempts = j.attempts + 1,
    claimed_by = $3, lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
"""
    forms = {
        "FROM picked WHERE j.id = picked.id": picked + "FROM picked WHERE j.id = picked.id",
        "WHERE j.id = ANY(ARRAY(SELECT id FROM picked))": picked
        + "WHERE j.id = ANY(ARRAY(SELECT id FROM picked))",
    }
    rows = []
    with env.admin() as conn:
        for name, sql in forms.items():
            for mode in ("auto", "force_generic_plan"):
                rows.append(
                    (name, mode, _prepared_timing(conn, sql + " RETURNING j.id", mode, calls))
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proposals", description=__doc__)
    parser.add_argument("--dsn", default=None, help="an existing server (default: start one)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = Sizes(runs=args.runs)
    with tempfile.TemporaryDirectory(prefix="substrate-proposals-") as work:
        if args.dsn:
            return _run(Env(args.dsn, find_pg_bindir(), Path(work), sizes))
        with EphemeralPostgres(durable=True, settings=SERVER_SETTINGS) as server:
            return _run(Env(server.conninfo, server.bindir, Path(work), sizes))


def _run(env: Env) -> int:
    with Substrate.connect(env.conninfo, min_size=1, max_size=1) as client:
        client.migrate()
    reset(env)
    figs: dict[tuple[str, int], Figure] = {}
    claim_ms: dict[tuple[str, int], list[float]] = {}
    for rep in range(env.sizes.runs):
        env.say(f"proposals, run {rep + 1}/{env.sizes.runs}")
        for batch, clients in SHAPES:
            for label, script in SCRIPTS.items():
                top_up(env, BACKLOG)
                vacuum(env)
                rate, ms = pgbench_rate(env, script, batch=batch, clients=clients)
                key = (label, batch)
                figs.setdefault(key, Figure(f"{label}, batch {batch}", "jobs/s")).add(rate)
                claim_ms.setdefault(key, []).append(ms)
    top_up(env, BACKLOG)
    vacuum(env)
    generic = generic_plan_table(env)
    reset(env)

    out = sys.stdout
    print("pgbench, durable server, same backlog, vacuumed before each run", file=out)
    for batch, clients in SHAPES:
        base = figs[("library (claim_complete.sql)", batch)]
        print(f"\nbatch {batch}, {clients} clients", file=out)
        for label in SCRIPTS:
            fig = figs[(label, batch)]
            ms = statistics.median(claim_ms[(label, batch)])
            print(
                f"  {label:30} {fmt(fig.median):>8} jobs/s [{fmt(fig.low)} - {fmt(fig.high)}]"
                f"  claim {ms:.3f} ms  {fig.median / base.median:.2f}x",
                file=out,
            )
    print("\nclaim (LIMIT 1) as a prepared statement, ms per call, rolled back", file=out)
    for name, mode, ms in generic:
        print(f"  {name:48} {mode:20} {ms:.3f}", file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
