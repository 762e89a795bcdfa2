"""The bench's surroundings: its own durable Postgres, schemas, backlogs, and run sizes.

Every scenario runs against one private server started with durable settings (fsync,
synchronous_commit and full_page_writes on, as a production server runs): a commit
waits for its WAL flush, which is what a job queue's throughput is made of.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from substrate_db import Substrate

MAIN_SCHEMA = "substrate"
HISTORY_SCHEMA = "bench_history"
KIND = "bench"

SERVER_SETTINGS: dict[str, str] = {
    # Durability stays at Postgres' defaults (EphemeralPostgres(durable=True)). These only
    # keep checkpoints out of the measured windows and give the working set room: the
    # 1M-row history alone is about 250 MB with its indexes.
    "shared_buffers": "512MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
    # More clients than the stock 100: pools of several scenarios and the peers coexist.
    "max_connections": "300",
}


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does; `quick` shrinks everything for a smoke run."""

    runs: int = 3
    seconds: int = 2
    """One timed run of a claim scenario (pgbench takes whole seconds)."""
    enqueue_seconds: int = 1
    """One timed run of the enqueue scenario: inserts are steady, a second is plenty."""
    warmup: float = 0.3
    backlog: int = 20_000
    """Available jobs kept in the queue during claim scenarios (topped up before each run)."""
    enqueue_batch: int = 1000
    drain: int = 20_000
    """The backlog the worker and the peers drain."""
    procrastinate_drain: int = 3_000
    """Procrastinate drains ~15x slower than PgQueuer: a smaller backlog keeps it in budget."""
    history: int = 1_000_000
    memory_jobs: int = 200_000
    latency_rate: float = 50.0
    """Jobs per second enqueued one by one in the latency scenario: a light, steady rate."""
    latency_seconds: float = 2.0

    @classmethod
    def quick(cls) -> Sizes:
        """A smoke run: every scenario once, small, in well under a minute."""
        return cls(
            runs=1,
            seconds=1,
            enqueue_seconds=1,
            warmup=0.2,
            backlog=5_000,
            drain=3_000,
            procrastinate_drain=500,
            history=100_000,
            memory_jobs=20_000,
            latency_rate=50.0,
            latency_seconds=1.0,
        )


@dataclass
class Env:
    """Where the bench's server is and how to reach it."""

    conninfo: str
    bindir: Path
    workdir: Path
    sizes: Sizes
    server_settings: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    @property
    def pgbench(self) -> Path:
        return self.bindir / "pgbench"

    def conninfo_for(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(self.conninfo, dbname=dbname)

    def say(self, message: str) -> None:
        """Progress goes to stderr, so `--json` keeps stdout to one document."""
        stamp = time.strftime("%H:%M:%S")
        line = f"[{stamp}] {message}"
        self.log.append(line)
        print(line, file=_stderr(), flush=True)

    @contextmanager
    def admin(self) -> Iterator[psycopg.Connection[Any]]:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            yield conn

    def client(self, schema: str = MAIN_SCHEMA, **pool: Any) -> Substrate:
        return Substrate.connect(self.conninfo, schema=schema, **pool)


def _stderr() -> Any:
    import sys

    return sys.stderr


def jobs_table(schema: str) -> sql.Composed:
    return sql.SQL("{}.jobs").format(sql.Identifier(schema))


def reset(env: Env, schema: str = MAIN_SCHEMA) -> None:
    """Empty the jobs table (and what hangs off it) and vacuum it: each scenario starts
    on a clean table, not on the dead tuples of the previous one."""
    with env.admin() as conn:
        tables = conn.execute(
            "SELECT format('%%I.%%I', schemaname, tablename) FROM pg_tables "
            "WHERE schemaname = %s AND tablename IN ('jobs', 'serial_keys')",
            [schema],
        ).fetchall()
        if not tables:
            return
        names = sql.SQL(", ").join(sql.SQL(t[0]) for t in tables)
        conn.execute(sql.SQL("TRUNCATE {}").format(names))
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(jobs_table(schema)))


def available(env: Env, schema: str = MAIN_SCHEMA) -> int:
    with env.admin() as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE state = 'available'").format(jobs_table(schema))
        ).fetchone()
    assert row is not None
    return int(row[0])


def top_up(env: Env, target: int, schema: str = MAIN_SCHEMA) -> int:
    """Bring the backlog to `target` available jobs with one server-side INSERT (setup,
    not a measurement: the enqueue scenario measures the library's own insert)."""
    missing = target - available(env, schema)
    if missing > 0:
        add_jobs(env, missing, schema)
    return max(missing, 0)


def add_jobs(env: Env, count: int, schema: str = MAIN_SCHEMA) -> None:
    """Insert `count` available jobs in one statement (one insert notification)."""
    with env.admin() as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (kind, payload) "
                "SELECT %s, jsonb_build_object('n', g) FROM generate_series(1, %s) g"
            ).format(jobs_table(schema)),
            [KIND, count],
        )


def vacuum(env: Env, schema: str = MAIN_SCHEMA) -> None:
    with env.admin() as conn:
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(jobs_table(schema)))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
