"""The soak: 100k jobs through one worker process with 8 slots, pruning as it goes.

Marked `slow` (SUBSTRATE_SLOW_TESTS=1; SUBSTRATE_SOAK_JOBS changes the size). Jobs are
enqueued in waves while the worker runs; after each wave's jobs finish, finished jobs
are pruned in batches, as an operator's cron would. It reports, per wave: throughput
(jobs finished per second), the worker's resident memory, the jobs table's size (heap +
indexes) and its dead tuples. It asserts what does not depend on the machine's speed:
every job completed once, the worker's memory stays flat (after the first wave, within
a bound), and the table stays bounded when pruning runs (its size after the last wave
is within a small factor of its size after the first, instead of growing with the
total). Throughput is printed, not asserted.

Dead tuples are left to autovacuum with the table's own settings (migration 0001), on a
server whose autovacuum wakes every second: the stock 60 s nap is longer than a wave.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from reliability._servers import ControlledPostgres
from reliability._workers import wait_until

from substrate_db import Substrate
from substrate_db.ops import prune

TESTS_DIR = Path(__file__).resolve().parents[1]
WAVES = 10


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def table_stats(conn: psycopg.Connection) -> tuple[int, int, int]:
    """(heap + index bytes, dead tuples, live tuples) of substrate.jobs."""
    row = conn.execute(
        "SELECT pg_total_relation_size('substrate.jobs'), n_dead_tup, n_live_tup"
        " FROM pg_stat_user_tables WHERE relid = 'substrate.jobs'::regclass"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.slow
def test_soak_throughput_memory_and_bloat(tmp_path: Path) -> None:
    total = int(os.environ.get("SUBSTRATE_SOAK_JOBS", "100000"))
    per_wave = total // WAVES
    with ControlledPostgres(settings={"autovacuum_naptime": "1"}) as server:
        dsn = server.create_database("soak")
        log = tmp_path / "worker.err"
        with open(log, "wb") as err:
            worker = subprocess.Popen(
                [
                    sys.executable, "-m", "substrate_db.cli", "--dsn", dsn, "worker",
                    "--kinds", "soak", "--handler", "reliability.handlers:echo",
                    "--concurrency", "8", "--json",
                ],
                cwd=TESTS_DIR,
                stdout=subprocess.PIPE,
                stderr=err,
            )  # fmt: skip
        rows: list[tuple[int, float, int, tuple[int, int, int], tuple[int, int, int], int]] = []
        try:
            with (
                Substrate.connect(dsn, max_size=2) as client,
                psycopg.connect(dsn, autocommit=True) as conn,
            ):
                for wave in range(WAVES):
                    started = time.monotonic()
                    for start in range(0, per_wave, 5000):
                        n = min(5000, per_wave - start)
                        client.enqueue_many([{"kind": "soak", "payload": {"w": wave}}] * n)
                    # Pruned jobs had completed: the wave is done when the completed ones
                    # left in the table make up the rest.
                    target = (wave + 1) * per_wave - sum(r[5] for r in rows)

                    def finished(target: int = target) -> bool:
                        row = conn.execute(
                            "SELECT count(*) FROM substrate.jobs WHERE state = 'completed'"
                        ).fetchone()
                        return row is not None and int(row[0]) >= target

                    wait_until(finished, f"wave {wave} to finish", timeout=300)
                    elapsed = time.monotonic() - started
                    memory = rss_kib(worker.pid)
                    before = table_stats(conn)
                    deleted = client.run(prune(client.queries, 0, batch_size=2000)).deleted
                    after = table_stats(conn)
                    rows.append((wave, per_wave / elapsed, memory, before, after, deleted))
                    print(
                        f"wave {wave}: {per_wave / elapsed:8.0f} jobs/s, worker rss "
                        f"{memory / 1024:6.1f} MiB, jobs table {before[0] / 2**20:6.1f} MiB "
                        f"({before[1]} dead) -> pruned {deleted} -> {after[0] / 2**20:6.1f} MiB "
                        f"({after[1]} dead)"
                    )
        finally:
            worker.send_signal(signal.SIGTERM)
            out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0, log.read_text()[-2000:]
        assert sum(r[5] for r in rows) == total  # every job completed (and was pruned once)
        # Memory flat: after warming up (wave 1), within 50% + 20 MiB.
        warm = rows[1][2]
        assert max(r[2] for r in rows[1:]) <= warm * 1.5 + 20 * 1024, rows
        # Bounded table: the last wave's size is not ten waves' worth of rows.
        first_size, last_size = rows[0][3][0], rows[-1][3][0]
        assert last_size <= 3 * first_size, (first_size, last_size)
        print(f"worker: {out.decode().strip()}")
