"""`python -m bench.serialcost`: what the serial-key machinery costs a claim of jobs without
a key (issue 7 asks that the plain claim's cost stay unchanged).

Runs the library's claim (`claim_jobs`, with the serial-key candidates filter, key locks
and key bookkeeping) and the same claim with those parts cut out, interleaved, one job
per call, on one backlog of keyless jobs, under the plan cache mode our pools use
(`force_generic_plan`) and under Postgres' default (`auto`). Not part of `make bench`.

Usage: python -m bench.serialcost [--calls N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg

from substrate_db import Substrate
from substrate_db._queries import rendered_queries
from substrate_db.testing._server import EphemeralPostgres

# The library's claim without the serial-key parts: the baseline of a keyless claim.
PLAIN_CLAIM = """WITH picked AS MATERIALIZED (
    SELECT c.id
    FROM unnest(%(kinds)s::text[]) AS k (kind)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM "substrate".jobs j
        WHERE j.state = 'available'
          AND j.kind = k.kind
          AND j.run_at <= coalesce(%(now)s::timestamptz, now())
        ORDER BY j.priority, j.run_at, j.id
        LIMIT %(limit)s
        FOR UPDATE OF j SKIP LOCKED
    ) AS c
    ORDER BY c.priority, c.run_at, c.id
    LIMIT %(limit)s
)
UPDATE "substrate".jobs j
SET state = 'running', claim_epoch = j.claim_epoch + 1, attempts = j.attempts + 1,
    claimed_by = %(slot_id)s,
    lease_expires_at = coalesce(%(now)s::timestamptz, now())
                       + make_interval(secs => %(lease_secs)s),
    updated_at = coalesce(%(now)s::timestamptz, now())
WHERE j.id = ANY(ARRAY(SELECT picked.id FROM picked))
RETURNING j.id, j.kind, j.payload, j.priority, j.run_at, j.attempts, j.max_attempts,
          j.claim_epoch, j.claimed_by, j.lease_expires_at, j.dedupe_key, j.created_at,
          j.source_id, j.serial_key"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="claims per variant and mode")
    args = parser.parse_args()
    library = rendered_queries("substrate")["claim_jobs"].sql
    params = {"kinds": ["k"], "now": None, "limit": 1, "slot_id": "bench", "lease_secs": 60}
    rounds, per_round = 20, max(1, args.calls // 20)
    with EphemeralPostgres(durable=True) as pg:
        with Substrate.connect(pg.conninfo) as s:
            s.migrate()
            for _ in range(2 * (4 * rounds * per_round) // 10_000 + 1):
                s.enqueue_many([{"kind": "k"} for _ in range(10_000)])
        for mode in ("force_generic_plan", "auto"):
            with psycopg.connect(pg.conninfo, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE substrate.jobs")
                conn.execute(f"SET plan_cache_mode = {mode}")
                ms: dict[str, list[float]] = {"library claim": [], "claim without serial keys": []}
                variants = list(zip(ms, (library, PLAIN_CLAIM), strict=True))
                for r in range(rounds):
                    for name, query in variants if r % 2 else variants[::-1]:
                        start = time.perf_counter()
                        for _ in range(per_round):
                            conn.execute(query, params).fetchall()
                        ms[name].append((time.perf_counter() - start) / per_round * 1000)
                base = statistics.median(ms["claim without serial keys"][2:])
                print(f"plan_cache_mode={mode}")
                for name, values in ms.items():
                    med = statistics.median(values[2:])
                    print(f"  {name:28} {med:6.3f} ms per claim  {med / base:4.2f}x")


if __name__ == "__main__":
    main()
