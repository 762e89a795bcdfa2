"""`python -m bench.sqlcost`: server time per job, ours against PgQueuer's, by statement.

Starts a durable server with `pg_stat_statements` (planning tracked too), warms up our
worker and a PgQueuer consumer, then drains the same backlog once with each and prints,
per statement, the calls, the server time (planning + execution) and the WAL records, and
the totals per job. Not part of `make bench`: it answers "is our SQL or our worker the
limit?", which the ratios alone cannot.

Usage: python -m bench.sqlcost [--jobs N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import psycopg

from substrate_db import Substrate
from substrate_db.testing._server import EphemeralPostgres

from . import drain
from .env import SERVER_SETTINGS, Env, Sizes

STATEMENTS = """
SELECT s.calls,
       round((s.total_exec_time + s.total_plan_time)::numeric, 1) AS ms,
       round(s.total_plan_time::numeric, 1) AS plan_ms,
       s.wal_records,
       left(regexp_replace(s.query, '\\s+', ' ', 'g'), 60) AS query
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = %s
ORDER BY 2 DESC
LIMIT 6
"""
TOTALS = """
SELECT coalesce(sum(s.total_exec_time + s.total_plan_time), 0), coalesce(sum(s.wal_records), 0)
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = %s
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sqlcost", description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    args = parser.parse_args(argv)
    n = args.jobs
    settings = SERVER_SETTINGS | {
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track_planning": "on",
    }
    with (
        tempfile.TemporaryDirectory(prefix="substrate-sqlcost-") as work,
        EphemeralPostgres(durable=True, settings=settings) as server,
    ):
        env = Env(server.conninfo, server.bindir, Path(work), Sizes())
        with Substrate.connect(server.conninfo, min_size=1, max_size=1) as client:
            client.migrate()
        with psycopg.connect(server.conninfo, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        ours_db = psycopg.conninfo.conninfo_to_dict(server.conninfo)["dbname"]
        rates = {}
        # Warm-up drains first (both), so the measured ones run on a warm server.
        drain.drain_ours(env, n)
        peer = drain.PeerSession(env, drain.PGQUEUER, n)
        try:
            peer.drain()
            peer_db = peer.dbname
            with psycopg.connect(server.conninfo, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")
            rates["substrate-db worker"] = (n / drain.drain_ours(env, n), str(ours_db))
            rates[drain.PGQUEUER.name] = (peer.drain(), peer_db)
            with psycopg.connect(server.conninfo, autocommit=True) as conn:
                for name, (rate, db) in rates.items():
                    total_ms, wal = conn.execute(TOTALS, [db]).fetchone() or (0, 0)
                    per_job_us = float(total_ms) * 1000 / n
                    print(
                        f"\n{name}: {rate:,.0f} jobs/s; server time {per_job_us:.1f} us/job,"
                        f" {float(wal) / n:.1f} WAL records/job (all its statements)"
                    )
                    for calls, ms, plan_ms, wal_records, query in conn.execute(STATEMENTS, [db]):
                        print(
                            f"  {calls:>6} calls {ms:>8} ms (plan {plan_ms:>6})"
                            f" {wal_records:>8} WAL  {query}"
                        )
        finally:
            peer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
