"""`python -m bench`: start a durable Postgres, run the scenarios, print one table.

Scenarios (issue 5): (1) enqueue one by one and in bulk; (2) claim + complete one at a
time with 1, 4 and 8 slots, sync and async; (3) batch claim (50) + complete; (4)
enqueue-to-claim latency with and without LISTEN/NOTIFY; (5) the claim with a long
history of finished jobs versus none; (6) the worker's memory over a long drain; and the
ready worker draining a backlog next to PgQueuer and Procrastinate. Each figure is the
median of several runs with min and max; each is printed with its ratio to the SQL
ceiling (pgbench running the library's own statements) measured in the same run.

`--json` prints one JSON document on stdout (progress goes to stderr); `--quick` is a
smoke run of a few tens of seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from substrate_db import Substrate
from substrate_db.testing._server import EphemeralPostgres, find_pg_bindir

from . import drain, explain, throughput
from .env import HISTORY_SCHEMA, MAIN_SCHEMA, SERVER_SETTINGS, Env, Sizes, machine, reset, top_up
from .stats import Figure, Row, Target, render_table

SCENARIOS = ("enqueue", "claims", "latency", "history", "drain", "memory")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 3)")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios among {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip PgQueuer and Procrastinate")
    parser.add_argument(
        "--explain", action="store_true", help="also print EXPLAIN (ANALYZE, BUFFERS) plans"
    )
    parser.add_argument(
        "--dsn",
        default=None,
        help="bench an existing server instead of starting one (its `postgres` database "
        "is used: schemas are dropped and databases created)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown scenarios {sorted(unknown)}; choose among {SCENARIOS}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = "python -m bench " + shlex.join(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.runs is not None:
        sizes = Sizes(**{**sizes.__dict__, "runs": args.runs})
    began = time.perf_counter()
    # Logs of the consumer processes and the pgbench scripts; kept when a scenario failed.
    work = Path(tempfile.mkdtemp(prefix="substrate-bench-"))
    if args.dsn:
        env = Env(args.dsn, find_pg_bindir(), work, sizes)
        report = run(env, args)
    else:
        with EphemeralPostgres(durable=True, settings=SERVER_SETTINGS) as server:
            env = Env(server.conninfo, server.bindir, work, sizes, dict(SERVER_SETTINGS))
            env.say(f"PostgreSQL {server.version}, durable, socket {server.socket_dir}")
            report = run(env, args)
    if report["failed_scenarios"]:
        report["notes"].append(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    report["wall_seconds"] = round(time.perf_counter() - began, 1)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        print(report["table"])
        for note in report["notes"]:
            print(f"note: {note}")
        print(f"\nwall time {report['wall_seconds']} s ({report['command']})")
    return 0


def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only.split(","))
    with env.admin() as conn:
        version = conn.execute("SHOW server_version").fetchone()
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                [
                    [
                        "fsync",
                        "synchronous_commit",
                        "full_page_writes",
                        "wal_sync_method",
                        "shared_buffers",
                        "max_wal_size",
                    ]
                ],
            ).fetchall()
        )
        conn.execute(f'DROP SCHEMA IF EXISTS "{MAIN_SCHEMA}" CASCADE')
        conn.execute(f'DROP SCHEMA IF EXISTS "{HISTORY_SCHEMA}" CASCADE')
    with Substrate.connect(env.conninfo, min_size=1, max_size=1) as client:
        client.migrate()

    figs: dict[str, Figure] = {}
    notes: list[str] = []
    extra: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def enqueue() -> None:
        m = throughput.scenario_enqueue(env)
        figs.update({f"enqueue.{k}": v for k, v in m.figures.items()})
        notes.extend(m.notes)

    def claims() -> None:
        m = throughput.scenario_claims(env)
        figs.update({f"claims.{k}": v for k, v in m.figures.items()})
        notes.extend(m.notes)

    def drains() -> None:
        notes.extend(drain.scenario_drain(env, peers=not args.no_peers, into=figs, prefix="drain."))

    def latency() -> None:
        figs.update({f"latency.{k}": v for k, v in drain.scenario_latency(env).items()})

    def history() -> None:
        m = throughput.scenario_history(env)
        figs.update({f"history.{k}": v for k, v in m.figures.items()})
        notes.extend(m.notes)
        top_up(env, env.sizes.backlog, HISTORY_SCHEMA)
        extra["explain_history"] = explain.hot_path_plans(env, HISTORY_SCHEMA, limit=1)

    def memory() -> None:
        mem, trace = drain.scenario_memory(env)
        figs.update({f"memory.{k}": v for k, v in mem.items()})
        extra["memory_trace"] = trace.as_dict()

    steps = {
        "enqueue": enqueue,
        "claims": claims,
        "drain": drains,
        "latency": latency,
        "history": history,
        "memory": memory,
    }
    failed: list[str] = []
    for name, step in steps.items():
        if name not in only:
            continue
        began = time.perf_counter()
        try:
            step()
        except Exception as exc:
            # One broken scenario (the library moves under the bench) must not cost the
            # others: report it and go on.
            failed.append(name)
            notes.append(f"scenario {name} failed: {type(exc).__name__}: {exc}")
            env.say(f"{name} FAILED: {type(exc).__name__}: {exc}")
            try:
                reset(env)
            except Exception as cleanup:  # the server itself may be the problem
                notes.append(f"cleanup after {name} failed: {cleanup}")
        timings[name] = round(time.perf_counter() - began, 1)
        env.say(f"{name}: {timings[name]} s")
    reset(env)
    top_up(env, env.sizes.backlog)
    extra["explain"] = {
        **explain.hot_path_plans(env, MAIN_SCHEMA, limit=1),
        **explain.hot_path_plans(env, MAIN_SCHEMA, limit=50),
    }
    reset(env)
    extra["failed_scenarios"] = failed

    rows, targets = compare(figs)
    table = render_table(rows, targets)
    if args.explain:
        for title, plan in {**extra["explain"], **extra.get("explain_history", {})}.items():
            print(f"\n-- {title}\n{plan}", file=sys.stderr)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": args.command.strip(),
        "machine": machine(),
        "server": {"version": version[0] if version else None, "settings": settings},
        "sizes": env.sizes.__dict__,
        "peers": {
            "requirements": drain.PEER_REQUIREMENTS.read_text().splitlines()
            if not args.no_peers
            else [],
            "pgqueuer_batch_size": drain.PGQUEUER_BATCH,
            "procrastinate_concurrency": drain.PROCRASTINATE_CONCURRENCY,
        },
        "worker": {"concurrency": drain.WORKER_CONCURRENCY, "batch_size": drain.WORKER_BATCH},
        "scenario_seconds": timings,
        "figures": {k: v.as_dict() for k, v in figs.items()},
        "rows": [r.as_dict() for r in rows],
        "targets": [t.as_dict() for t in targets],
        "notes": notes,
        "table": table,
        "failed_scenarios": extra.pop("failed_scenarios"),
        **extra,
    }


def compare(figs: dict[str, Figure]) -> tuple[list[Row], list[Target]]:
    """The table's rows (each figure against what it is measured against) and the
    targets of issue 5 computed from the same figures."""
    f = figs.get
    rows: list[Row] = []

    def row(scenario: str, key: str, base: str | None = None, label: str = "") -> None:
        if key in figs:
            rows.append(Row(scenario, figs[key], f(base) if base else None, label))

    row("1 enqueue", "enqueue.one_sql")
    row("1 enqueue", "enqueue.one_lib", "enqueue.one_sql", "SQL ceiling")
    row("1 enqueue", "enqueue.bulk_sql")
    row("1 enqueue", "enqueue.bulk_lib", "enqueue.bulk_sql", "SQL ceiling")
    row("1 enqueue", "enqueue.bulk_lib", "enqueue.one_lib", "one by one")
    for slots in (1, 4, 8):
        row("2 one at a time", f"claims.sql_{slots}_1")
        row("2 one at a time", f"claims.sync_{slots}_1", f"claims.sql_{slots}_1", "SQL ceiling")
        row("2 one at a time", f"claims.async_{slots}_1", f"claims.sql_{slots}_1", "SQL ceiling")
    for slots in (1, 4):
        row("3 batch 50", f"claims.sql_{slots}_50")
        row("3 batch 50", f"claims.sync_{slots}_50", f"claims.sql_{slots}_50", "SQL ceiling")
        row("3 batch 50", f"claims.async_{slots}_50", f"claims.sql_{slots}_50", "SQL ceiling")
        row("3 batch 50", f"claims.sync_{slots}_50", f"claims.sync_{slots}_1", "one at a time")
    window = f("drain.ceiling")
    row("worker drain", "drain.ceiling")
    for key in ("drain.worker", "drain.pgqueuer", "drain.pgqueuer16", "drain.procrastinate"):
        row("worker drain", key, "drain.ceiling", "batch SQL ceiling")
    row("worker drain", "drain.worker", "drain.pgqueuer", "PgQueuer")
    row("worker drain", "drain.worker", "drain.pgqueuer16", "PgQueuer batch 16")
    row("worker drain", "drain.worker", "drain.procrastinate", "Procrastinate")
    for key in ("notify_p50", "notify_p99", "poll_p50", "poll_p99"):
        row("4 latency", f"latency.{key}")
    row("5 history", "history.empty_sql")
    row("5 history", "history.hist_sql", "history.empty_sql", "empty table")
    row("5 history", "history.empty_lib")
    row("5 history", "history.hist_lib", "history.empty_lib", "empty table")
    row("6 memory", "memory.start")
    row("6 memory", "memory.first")
    row("6 memory", "memory.second", "memory.first", "first half")
    row("6 memory", "memory.peak")
    if "memory.rate" in figs:
        rows.append(Row("6 memory", figs["memory.rate"]))

    def r(a: str, b: str | Figure | None) -> float | None:
        base = b if isinstance(b, Figure) or b is None else f(b)
        fa = f(a)
        if fa is None or base is None or not fa.samples or not base.samples or not base.median:
            return None
        return fa.median / base.median

    hist_cost = r("history.empty_lib", "history.hist_lib")
    targets = [
        Target(
            "one at a time, 4 slots sync / SQL ceiling", r("claims.sync_4_1", "claims.sql_4_1"), 0.7
        ),
        Target(
            "one at a time, 4 slots async / SQL ceiling",
            r("claims.async_4_1", "claims.sql_4_1"),
            0.7,
        ),
        Target("worker drain / batch SQL ceiling (same window)", r("drain.worker", window), 0.5),
        Target("worker drain / PgQueuer drain", r("drain.worker", "drain.pgqueuer"), 3.0),
        Target(
            "batch 50 / one at a time (library, 4 slots)",
            r("claims.sync_4_50", "claims.sync_4_1"),
            5.0,
        ),
        Target("bulk enqueue / one by one", r("enqueue.bulk_lib", "enqueue.one_lib"), 20.0),
        Target(
            "claim cost, history / empty (SQL)",
            r("history.hist_sql", "history.empty_sql"),
            1.5,
            at_most=True,
        ),
        Target("claim+complete time, history / empty (library)", hist_cost, 1.5, at_most=True),
        Target(
            "latency p50 with LISTEN/NOTIFY",
            f("latency.notify_p50").median if f("latency.notify_p50") else None,  # type: ignore[union-attr]
            10.0,
            at_most=True,
            unit=" ms",
        ),
        Target(
            "worker RSS, 2nd half / 1st half of drain",
            r("memory.second", "memory.first"),
            1.1,
            at_most=True,
        ),
    ]
    return rows, targets
