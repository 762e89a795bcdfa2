"""Faults the library must ride through: Postgres down at start, restarted or crashed
mid-run, a connection killed between claim and complete, lock and statement timeouts.

Tests that take Postgres down run their own server (`own_postgres`), never the shared
one. Waits are bounded polls (`wait_until`): they turn a hang into a failure, they do
not measure anything. Time inside the substrate moves through `now=` wherever a test
controls the clock; the worker runs use real leases of a few seconds.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from substrate_db import (
    ClaimedJob,
    ConnectionFailed,
    DatabaseError,
    JobState,
    Substrate,
    WriteBackReason,
)
from substrate_db.worker import WorkerOptions

from ._pgbouncer import PgBouncer
from ._servers import ControlledPostgres
from ._workers import ThreadWorker, wait_until

TESTS_DIR = Path(__file__).resolve().parents[1]


def db_now(client: Substrate) -> Any:
    with client.pool.connection() as conn:
        return conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]


def count(conninfo: str, where: str = "true") -> int | None:
    """Rows of substrate.jobs matching `where` (a constant condition written in this
    file), on a fresh connection; None while the server is down (the caller polls on)."""
    try:
        with psycopg.connect(conninfo, connect_timeout=2) as conn:
            row = conn.execute(f"SELECT count(*) FROM substrate.jobs WHERE {where}").fetchone()
    except psycopg.OperationalError:
        return None
    return int(row[0]) if row else None


def echo_epoch(job: ClaimedJob) -> dict[str, int]:
    time.sleep(random.uniform(0, 0.01))
    return {"epoch": job.claim_epoch}


def slow_echo_epoch(job: ClaimedJob) -> dict[str, int]:
    # Long enough that a run of a few hundred jobs is still going when Postgres goes down.
    time.sleep(random.uniform(0.02, 0.06))
    return {"epoch": job.claim_epoch}


# -- Postgres down at start ----------------------------------------------------------------


def test_client_built_while_postgres_is_down_works_once_it_is_up(
    own_postgres: ControlledPostgres,
) -> None:
    dsn = own_postgres.create_database("app")
    own_postgres.stop_server()
    # Building the client does not need the server; calls fail with a typed error.
    with Substrate.connect(dsn, timeout=0.5) as client:
        for _ in range(3):
            with pytest.raises(ConnectionFailed):
                client.enqueue("k")
        own_postgres.start_server()

        def enqueue() -> int | None:
            try:
                return client.enqueue("k")
            except ConnectionFailed:
                return None  # the pool reconnects in the background, with backoff

        job_id = wait_until(enqueue, "the same client to reach the restarted server")
        assert [j.id for j in client.list_jobs()] == [job_id]  # failed calls wrote nothing


def test_worker_started_while_postgres_is_down_resumes(own_postgres: ControlledPostgres) -> None:
    dsn = own_postgres.create_database("app")
    own_postgres.stop_server()
    worker = ThreadWorker(
        dsn, echo_epoch, WorkerOptions(kinds=["k"], lease_secs=30, poll_secs=0.2)
    ).start()
    try:
        # Let the worker meet the dead server: its claims wait on a pool that keeps
        # failing to connect in the background (a pause, not a measurement).
        time.sleep(1.0)
        assert worker.alive
        own_postgres.start_server()
        with Substrate.connect(dsn) as client:
            ids = client.enqueue_many([{"kind": "k"} for _ in range(5)])
            wait_until(lambda: count(dsn, "state = 'completed'") == 5, "the jobs to complete")
    finally:
        stats = worker.stop()
    assert stats.completed == 5 and len(ids) == 5


def test_intake_tick_while_postgres_is_down_skips_then_resumes(
    own_postgres: ControlledPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from psycopg.conninfo import conninfo_to_dict

    from substrate_db.intake import SQLiteTaskQueue, SubstrateConfig, SubstrateIntake

    dsn = own_postgres.create_database("app")
    parts = conninfo_to_dict(dsn)
    config = SubstrateConfig(
        enabled=True,
        credential="none",
        kinds=["k"],
        slot_id="slot-1",
        host=parts["host"],
        database="app",
        user="postgres",
        connect_timeout=1,
    )
    own_postgres.stop_server()
    caplog.set_level(logging.INFO, logger="substrate_db")
    with SubstrateIntake(
        config, SQLiteTaskQueue(tmp_path / "q.db"), resolve_credential=lambda _: "x"
    ) as intake:
        first = intake.tick()
        assert not first.claimed and first.skip_reason == "db-unreachable", first
        assert "[substrate] skip reason=db-unreachable" in caplog.text
        own_postgres.start_server()
        with Substrate.connect(dsn) as client:
            job_id = client.enqueue("k")
        # The first failure did not disable intake: a later tick claims.
        tick = wait_until(lambda: (t := intake.tick()).claimed and t, "a tick to claim")
        assert tick.job_id == job_id


def test_cli_worker_started_while_postgres_is_down_resumes(
    own_postgres: ControlledPostgres,
) -> None:
    dsn = own_postgres.create_database("app")
    own_postgres.stop_server()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "substrate_db.cli", "--dsn", dsn, "worker",
            "--kinds", "k", "--handler", "reliability.handlers:echo", "--lease-secs", "30",
        ],
        cwd=TESTS_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # long enough for a pre-flight to have given up
        assert proc.poll() is None, f"worker exited {proc.returncode}: {proc.stderr.read()}"  # type: ignore[union-attr]
        own_postgres.start_server()
        with Substrate.connect(dsn) as client:
            client.enqueue("k")
        wait_until(lambda: count(dsn, "state = 'completed'") == 1, "the job to complete", 30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


# -- Postgres restarted or crashed mid-run ---------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_mid_run_loses_nothing_and_applies_no_stale_write(mode: str) -> None:
    """A worker is mid-run when Postgres restarts (fast: clean shutdown) or crashes
    (immediate: SIGQUIT, crash recovery at start; synchronous_commit on, so every
    acknowledged commit survives). Pools reconnect; write-backs that failed are retried
    or reconciled by lease recovery; every job completes, and each result was written
    under the job's final epoch (a stale write-back applied would show an older one)."""
    total = 400
    server = ControlledPostgres(settings={"synchronous_commit": "on"}).start()
    try:
        dsn = server.create_database("app")
        with Substrate.connect(dsn) as client:
            client.enqueue_many([{"kind": "k", "max_attempts": 20} for _ in range(total)])
        options = WorkerOptions(kinds=["k"], concurrency=8, batch_size=10, lease_secs=3)
        worker = ThreadWorker(dsn, slow_echo_epoch, options).start()
        recovered = 0
        with Substrate.connect(dsn, timeout=1) as recovery:
            try:
                wait_until(
                    lambda: (count(dsn, "state = 'completed'") or 0) >= total // 5, "progress"
                )
                server.restart(mode)
                # Mid-run indeed: many jobs were still to do when the server came back.
                done_at_restart = count(dsn, "state = 'completed'")
                assert done_at_restart is not None and done_at_restart < total

                def all_done() -> bool:
                    nonlocal recovered
                    # Lease recovery runs throughout, as an owner would.
                    with contextlib.suppress(ConnectionFailed):
                        recovered += recovery.release_expired_leases().released
                    return count(dsn, "state = 'completed'") == total

                wait_until(all_done, f"all {total} jobs to complete after a {mode} restart", 120)
            finally:
                stats = worker.stop()
            rows = recovery.list_jobs(limit=total)
        assert len(rows) == total
        assert all(j.state == JobState.COMPLETED for j in rows)
        assert all(j.result == {"epoch": j.claim_epoch} for j in rows)
        assert stats.completed <= total
        print(f"{mode}: {done_at_restart}/{total} done at restart; {stats}; recovered {recovered}")
    finally:
        server.close()


# -- a connection killed between claim and complete ------------------------------------------


def kill_connections_of(client: Substrate, conninfo: str) -> None:
    """pg_terminate_backend() the connections of `client`'s pool (one, at max_size=1)."""
    with client.pool.connection() as conn:
        pid = conn.info.backend_pid
    with psycopg.connect(conninfo, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)


def test_executor_whose_connection_dies_after_claim_loses_the_job_after_its_lease(
    substrate_dsn: str,
) -> None:
    with (
        Substrate.connect(substrate_dsn, max_size=1) as crashed,
        Substrate.connect(substrate_dsn) as other,
    ):
        now = db_now(other)
        job_id = other.enqueue("k", now=now)
        job = crashed.claim_next_job("slot-a", ["k"], lease_secs=30, now=now)
        assert job is not None and job.id == job_id
        kill_connections_of(crashed, substrate_dsn)  # slot-a's connection is gone

        # Within the lease, nothing may take the job back.
        assert other.release_expired_leases(now=now + timedelta(seconds=29)).released == 0
        assert other.claim_next_job("slot-b", ["k"], now=now + timedelta(seconds=29)) is None
        # After it, recovery returns it and another slot gets it, with a new epoch.
        later = now + timedelta(seconds=31)
        assert other.release_expired_leases(now=later).requeued_ids == (job_id,)
        again = other.claim_next_job("slot-b", ["k"], lease_secs=30, now=later)
        assert again is not None and again.id == job_id and again.claim_epoch == 2

        # slot-a comes back late: its first call on the dead connection raises (a fault
        # is an error, never a silent success), then its write-back is refused by the fence.
        def late_complete() -> Any:
            try:
                return crashed.complete_job(job.id, job.claim_epoch, {"by": "a"})
            except ConnectionFailed:
                return None

        refused = wait_until(late_complete, "slot-a's pool to reconnect")
        assert (refused.ok, refused.reason) == (False, WriteBackReason.STALE_EPOCH)
        assert other.complete_job(again.id, again.claim_epoch, {"by": "b"}).ok
        final = other.get_job(job_id)
        assert final is not None and final.result == {"by": "b"}


def test_write_back_on_a_killed_connection_raises_then_lands_on_retry(
    substrate_dsn: str,
) -> None:
    with Substrate.connect(substrate_dsn, max_size=1) as client:
        client.enqueue("k")
        job = client.claim_next_job("slot-a", ["k"], lease_secs=60)
        assert job is not None
        kill_connections_of(client, substrate_dsn)
        outcomes = []
        for _ in range(5):
            try:
                outcomes.append(client.complete_job(job.id, job.claim_epoch, {"ok": 1}))
                break
            except ConnectionFailed:
                outcomes.append(None)
                # The write did not land: the job is still running under its epoch.
                with psycopg.connect(substrate_dsn) as conn:
                    state = conn.execute(
                        "SELECT state FROM substrate.jobs WHERE id = %s", [job.id]
                    ).fetchone()
                assert state == ("running",)
        assert outcomes[-1] is not None and outcomes[-1].ok


# -- lock and statement timeouts on the claim path -------------------------------------------


def hold_jobs_lock(conninfo: str) -> psycopg.Connection[Any]:
    """A transaction holding what a migration's ALTER TABLE holds: ACCESS EXCLUSIVE."""
    conn = psycopg.connect(conninfo)
    conn.execute("LOCK TABLE substrate.jobs IN ACCESS EXCLUSIVE MODE")
    return conn


@pytest.mark.parametrize(
    ("options", "sqlstate"),
    [("-c lock_timeout=100", "55P03"), ("-c statement_timeout=100", "57014")],
    ids=["lock_timeout", "statement_timeout"],
)
def test_claim_timeout_is_a_typed_error(substrate_dsn: str, options: str, sqlstate: str) -> None:
    """Timeouts set through the conninfo (libpq `options`) bound the claim, and surface
    as `DatabaseError` carrying the sqlstate."""
    with Substrate.connect(substrate_dsn, kwargs={"options": options}, max_size=1) as client:
        client.enqueue("k")
        holder = hold_jobs_lock(substrate_dsn)
        try:
            with pytest.raises(DatabaseError) as caught:
                client.claim_next_job("slot", ["k"])
            assert caught.value.sqlstate == sqlstate
        finally:
            holder.close()
        # The same client works once the lock is gone; nothing was claimed meanwhile.
        job = client.claim_next_job("slot", ["k"])
        assert job is not None and job.claim_epoch == 1


def test_claim_timeout_is_not_a_connection_failure(substrate_dsn: str) -> None:
    with Substrate.connect(
        substrate_dsn, kwargs={"options": "-c lock_timeout=50"}, max_size=1
    ) as client:
        client.enqueue("k")
        holder = hold_jobs_lock(substrate_dsn)
        try:
            with pytest.raises(DatabaseError) as caught:
                client.claim_next_job("slot", ["k"])
        finally:
            holder.close()
        assert not isinstance(caught.value, ConnectionFailed)


def test_worker_survives_claim_timeouts(
    substrate_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="substrate_db")
    with Substrate.connect(substrate_dsn) as client:
        client.enqueue_many([{"kind": "k"} for _ in range(10)])
    holder = hold_jobs_lock(substrate_dsn)
    worker = ThreadWorker(
        substrate_dsn,
        echo_epoch,
        WorkerOptions(kinds=["k"], lease_secs=30, poll_secs=0.2),
        connect_kwargs={"options": "-c lock_timeout=50"},
    ).start()
    try:
        wait_until(lambda: "lock timeout" in caplog.text, "a claim to time out")
        assert worker.alive
        holder.close()
        wait_until(lambda: count(substrate_dsn, "state = 'completed'") == 10, "the jobs")
    finally:
        holder.close()
        stats = worker.stop()
    assert stats.completed == 10
    assert "[substrate] claim error=" in caplog.text


def test_role_timeouts_bound_the_claim_behind_pgbouncer(own_postgres: ControlledPostgres) -> None:
    """PgBouncer 1.18 refuses libpq's `options`, so behind it timeouts come from the role
    (`ALTER ROLE ... SET lock_timeout`, as docs/security.md says); they apply there too."""
    dsn = own_postgres.create_database("app")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("CREATE ROLE substrate_worker LOGIN")
        admin.execute("ALTER ROLE substrate_worker SET lock_timeout = '100ms'")
        admin.execute("GRANT USAGE ON SCHEMA substrate TO substrate_worker")
        admin.execute(
            "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA substrate TO substrate_worker"
        )
        admin.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA substrate TO substrate_worker")
    bouncer = PgBouncer(dsn).start()
    try:
        via = bouncer.conninfo_for("app", user="substrate_worker")
        with pytest.raises(psycopg.OperationalError, match="options"):
            psycopg.connect(via + " options='-c lock_timeout=100'").close()
        with Substrate.connect(via, pgbouncer=True, max_size=1) as client:
            client.enqueue("k")
            holder = hold_jobs_lock(dsn)
            try:
                with pytest.raises(DatabaseError) as caught:
                    client.claim_next_job("slot", ["k"])
                assert caught.value.sqlstate == "55P03"
            finally:
                holder.close()
            assert client.claim_next_job("slot", ["k"]) is not None
    finally:
        bouncer.stop()


def test_claim_timeouts_are_a_client_option(pgbouncer_dsn: str, substrate_dsn: str) -> None:
    with Substrate.connect(
        pgbouncer_dsn, pgbouncer=True, lock_timeout=0.1, statement_timeout=5
    ) as client:
        client.enqueue("k")
        holder = hold_jobs_lock(substrate_dsn)
        try:
            with pytest.raises(DatabaseError) as caught:
                client.claim_next_job("slot", ["k"])
            assert caught.value.sqlstate == "55P03"
        finally:
            holder.close()
