"""`python -m bench.serialcost`: what the serial-key machinery costs a claim of jobs without
a key (issue 7 asks that the plain claim's cost stay unchanged).

Runs the library's claim (`claim_jobs`) and the same statement with its two serial-key
clauses cut out, interleaved, one job per call, on one backlog of keyless jobs, under
Postgres' default plan caching (`auto`, what our pools use: the claim is planned on every
call, so planning is part of the cost) and under `force_generic_plan` (execution alone).
The baseline is derived from the library's text at run time, so the two cannot drift
apart; the run stops if the clauses are not found. Then a claim that must walk past a
busy key's backlog (the worst case for a keyless job), and drains the same number of jobs
with and without keys through the library (claim 1 and 50 at a time), for what a key
costs the jobs that have one. Not part of `make bench`.

Usage: python -m bench.serialcost [--calls N]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import psycopg

from substrate_db import Substrate
from substrate_db._queries import rendered_queries
from substrate_db.testing._server import EphemeralPostgres

# The two serial-key clauses of claim_jobs: the candidate filter and the key taking.
_SERIAL_PARTS = (
    # from the filter's first line up to the ORDER BY that follows it
    re.compile(r"\n\s*AND \(j\.serial_key IS NULL\s+OR .*?(?=\n\s*ORDER BY)", re.S),
    re.compile(r"\n\s*AND CASE WHEN j\.serial_key IS NULL THEN true\s+ELSE [^\n]*END", re.S),
)


def without_serial_keys(claim: str) -> str:
    """The library's claim with its serial-key clauses removed: a keyless claim's baseline."""
    for part in _SERIAL_PARTS:
        claim, found = part.subn("", claim)
        if found != 1:
            raise SystemExit(f"serialcost: claim_jobs no longer matches {part.pattern!r}")
    return claim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="claims per variant and mode")
    args = parser.parse_args()
    library = rendered_queries("substrate")["claim_jobs"].sql
    plain = without_serial_keys(library)
    params = {"kinds": ["k"], "now": None, "limit": 1, "slot_id": "bench", "lease_secs": 60}
    rounds, per_round = 20, max(1, args.calls // 20)
    with EphemeralPostgres(durable=True) as pg:
        with Substrate.connect(pg.conninfo) as s:
            s.migrate()
            for _ in range(2 * (4 * rounds * per_round) // 10_000 + 1):
                s.enqueue_many([{"kind": "k"} for _ in range(10_000)])
        for mode in ("auto", "force_generic_plan"):
            with psycopg.connect(pg.conninfo, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE substrate.jobs")
                conn.execute(f"SET plan_cache_mode = {mode}")
                ms: dict[str, list[float]] = {"library claim": [], "claim without serial keys": []}
                variants = list(zip(ms, (library, plain), strict=True))
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
        busy_key(pg.conninfo, library, params)
        keyed_drain(pg.conninfo, rounds=6)


def busy_key(conninfo: str, claim: str, params: dict[str, object], backlog: int = 50_000) -> None:
    """A key whose job is running, with `backlog` more jobs queued ahead of the keyless
    work of the same kind: the claim's scan walks past all of them, in claim order, on
    every call. Against the same claim of a kind with no keyed jobs."""
    with Substrate.connect(conninfo) as s:
        s.enqueue("busy", serial_key="hot", priority=-1)
        assert s.claim_jobs("bench", ["busy"], 1)  # the key now runs a job
        for start in range(0, backlog, 10_000):
            n = min(10_000, backlog - start)
            s.enqueue_many([{"kind": "busy", "serial_key": "hot", "priority": -1}] * n)
        s.enqueue_many([{"kind": "busy"} for _ in range(2_000)])
        s.enqueue_many([{"kind": "calm"} for _ in range(2_000)])
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE substrate.jobs")
        ms: dict[str, list[float]] = {"busy": [], "calm": []}
        for r in range(10):
            for kind in ("busy", "calm") if r % 2 else ("calm", "busy"):
                start = time.perf_counter()
                for _ in range(20):
                    rows = conn.execute(claim, {**params, "kinds": [kind]}).fetchall()
                    assert rows and rows[0][-1] is None  # a keyless job, past the busy key
                ms[kind].append((time.perf_counter() - start) / 20 * 1000)
    base = statistics.median(ms["calm"])
    print(f"a busy key with {backlog:,} jobs queued ahead of the keyless work (auto)")
    for kind, label in (("calm", "claim, no keyed jobs"), ("busy", "claim past the busy key")):
        med = statistics.median(ms[kind])
        print(f"  {label:28} {med:6.3f} ms per claim  {med / base:5.1f}x")


def _drain_rate(s: Substrate, specs: list[dict[str, object]], limit: int) -> float:
    """Jobs per second to claim and complete `specs`, `limit` per claim, one slot."""
    s.enqueue_many(specs)
    start, done = time.perf_counter(), 0
    while jobs := s.claim_jobs("bench", ["d"], limit, lease_secs=60):
        s.complete_jobs([(j.id, j.claim_epoch, None) for j in jobs])
        done += len(jobs)
    assert done == len(specs)
    return done / (time.perf_counter() - start)


def keyed_drain(conninfo: str, rounds: int) -> None:
    """What a job with a key costs against one without: the same number of jobs drained
    through the library, keyless or spread over 200 keys (each key's jobs one at a time),
    interleaved."""
    print("drain through the library, 1 slot, 2,000 jobs per run (keyed: 200 keys x 10)")
    keyless = [{"kind": "d"} for _ in range(2000)]
    keyed = [{"kind": "d", "serial_key": f"key-{n % 200}"} for n in range(2000)]
    with Substrate.connect(conninfo, max_size=1) as s:
        for limit in (1, 50):
            rates: dict[str, list[float]] = {"without keys": [], "with keys": []}
            for r in range(rounds):
                order = [("without keys", keyless), ("with keys", keyed)]
                for name, specs in order if r % 2 else order[::-1]:
                    rates[name].append(_drain_rate(s, specs, limit))
            base = statistics.median(rates["without keys"])
            for name, values in rates.items():
                med = statistics.median(values)
                label = f"claim {limit} + complete, {name}"
                print(f"  {label:36} {med:8,.0f} jobs/s  {med / base:4.2f}x")


if __name__ == "__main__":
    main()
