"""Concurrent claimers, racing rescuers and racing migrations, on real connections."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg
import pytest

from substrate_db import JobState, Substrate, WriteBackReason
from substrate_db._queries import load_migrations
from substrate_db.errors import MigrationChecksumMismatch


@pytest.mark.parametrize("batch", [1, 7])
def test_eight_claimers_claim_each_job_exactly_once(substrate_dsn: str, batch: int) -> None:
    total = 2000
    with Substrate.connect(substrate_dsn) as setup:
        setup.enqueue_many([{"kind": "work", "payload": {"n": i}} for i in range(total)])
    start = threading.Barrier(8)

    def slot(n: int) -> list[int]:
        # Each slot has its own pool: separate connections, as separate processes would.
        with Substrate.connect(substrate_dsn, max_size=1) as client:
            start.wait()
            seen: list[int] = []
            while True:
                jobs = client.claim_jobs(f"slot-{n}", ["work"], batch, lease_secs=60)
                if not jobs:
                    return seen
                for job in jobs:
                    assert client.complete_job(job.id, job.claim_epoch, {"by": n}).ok
                    seen.append(job.id)

    with ThreadPoolExecutor(8) as pool:
        per_slot = list(pool.map(slot, range(8)))
    claims = Counter(job_id for ids in per_slot for job_id in ids)
    assert len(claims) == total and set(claims.values()) == {1}
    with Substrate.connect(substrate_dsn) as check, check.pool.connection() as conn:
        rows = conn.execute(
            "SELECT state, claim_epoch, attempts, count(*) FROM substrate.jobs GROUP BY 1, 2, 3"
        ).fetchall()
    assert rows == [("completed", 1, 1, total)]
    # More than one slot did real work (the race was real).
    assert sum(1 for ids in per_slot if ids) > 1


def test_stale_executor_is_refused_and_changes_nothing(substrate: Substrate) -> None:
    now = substrate.db_now()
    job_id = substrate.enqueue("long", now=now)
    old = substrate.claim_next_job("slot-old", ["long"], lease_secs=30, now=now)
    assert old is not None
    # slot-old goes quiet; its lease expires and recovery hands the job to slot-new.
    assert substrate.release_expired_leases(now=now + timedelta(seconds=31)).requeued == 1
    new = substrate.claim_next_job(
        "slot-new", ["long"], lease_secs=30, now=now + timedelta(seconds=32)
    )
    assert new is not None and new.id == job_id and new.claim_epoch == old.claim_epoch + 1
    before = substrate.get_job(job_id)

    for result in (
        substrate.complete_job(job_id, old.claim_epoch, {"from": "old"}),
        substrate.fail_job(job_id, old.claim_epoch, "old failed", retryable=False),
        substrate.extend_lease(job_id, old.claim_epoch, 3600),
        *substrate.complete_jobs([(job_id, old.claim_epoch, None)]),
        *substrate.fail_jobs([(job_id, old.claim_epoch, "x")]),
        *substrate.extend_leases([(job_id, old.claim_epoch)], 3600),
    ):
        assert not result.ok
        assert result.reason == WriteBackReason.STALE_EPOCH
        assert (result.expected_epoch, result.actual_epoch) == (old.claim_epoch, new.claim_epoch)
    assert substrate.get_job(job_id) == before

    assert substrate.complete_job(job_id, new.claim_epoch, {"from": "new"}).ok
    final = substrate.get_job(job_id)
    assert final is not None and final.result == {"from": "new"}


def test_write_back_after_lease_expiry_but_before_reclaim_is_applied(substrate: Substrate) -> None:
    now = substrate.db_now()
    job_id = substrate.enqueue("slow", now=now)
    job = substrate.claim_next_job("s", ["slow"], lease_secs=1, now=now)
    assert job is not None
    # The lease passed, but nobody took the job back: the late result still counts.
    assert substrate.complete_job(job_id, job.claim_epoch, now=now + timedelta(minutes=5)).ok


def test_rescuer_never_touches_a_job_completed_meanwhile(
    substrate: Substrate, substrate_dsn: str
) -> None:
    """River #1302/#1373: a rescuer matching on id alone overwrote a completed job."""
    now = substrate.db_now()
    job_id = substrate.enqueue("race", now=now)
    job = substrate.claim_next_job("s", ["race"], lease_secs=1, now=now)
    assert job is not None
    later = now + timedelta(seconds=10)
    # The executor's completion is in flight (row locked, not committed) when the
    # rescuer runs: the rescuer must skip the row, not wait and then overwrite it.
    with psycopg.connect(substrate_dsn) as executor:
        with executor.transaction():
            with Substrate(_single_conn_pool(executor)) as inside:
                assert inside.complete_job(job_id, job.claim_epoch, "done").ok
            assert substrate.release_expired_leases(now=later).released == 0
        assert substrate.release_expired_leases(now=later).released == 0
    final = substrate.get_job(job_id)
    assert final is not None and final.state == JobState.COMPLETED and final.result == "done"


def test_rescuer_then_executor_the_executor_loses(substrate: Substrate, substrate_dsn: str) -> None:
    """The other order: recovery holds the row; the executor's write-back waits, then
    sees the row was released (not running) and is refused."""
    now = substrate.db_now()
    job_id = substrate.enqueue("race", now=now)
    job = substrate.claim_next_job("s", ["race"], lease_secs=1, now=now)
    assert job is not None
    results: list[object] = []
    with psycopg.connect(substrate_dsn) as rescuer:
        with rescuer.transaction():
            with Substrate(_single_conn_pool(rescuer)) as inside:
                assert inside.release_expired_leases(now=now + timedelta(seconds=5)).requeued == 1
            t = threading.Thread(
                target=lambda: results.append(substrate.complete_job(job_id, job.claim_epoch))
            )
            t.start()
            t.join(0.3)
            assert t.is_alive(), "the write-back should wait for the rescuer's lock"
        t.join(10)
    (result,) = results
    assert result.reason == WriteBackReason.NOT_RUNNING
    stored = substrate.get_job(job_id)
    assert stored is not None and stored.state == JobState.AVAILABLE


def test_concurrent_migrate(substrate_dsn: str) -> None:
    start = threading.Barrier(4)

    def migrate(_: int) -> list[int]:
        with Substrate.connect(substrate_dsn, schema="fresh") as client:
            start.wait()
            return client.migrate()

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(migrate, range(4)))
    # Each migration is applied once, by whichever process got the lock first.
    applied = sorted(v for versions in outcomes for v in versions)
    assert applied == [m.version for m in load_migrations()]
    with Substrate.connect(substrate_dsn, schema="fresh") as client:
        assert client.migrate() == []
        assert all(m.applied_at is not None for m in client.migration_status())


def test_changed_migration_is_refused(substrate: Substrate) -> None:
    with substrate.pool.connection() as conn:
        conn.execute("UPDATE substrate.schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(MigrationChecksumMismatch, match=r"0001_jobs.*append-only"):
        substrate.migrate()
    with pytest.raises(MigrationChecksumMismatch):
        substrate.migration_status()


def test_pre_fencing_row(substrate: Substrate) -> None:
    with substrate.pool.connection() as conn:
        row = conn.execute(
            "INSERT INTO substrate.jobs (kind, state, claim_epoch, lease_expires_at)"
            " VALUES ('old', 'running', 0, now() + interval '1 hour') RETURNING id"
        ).fetchone()
    assert row is not None
    result = substrate.complete_job(row[0], 0)
    assert (result.ok, result.reason, result.actual_epoch) == (
        False,
        WriteBackReason.PRE_FENCING,
        0,
    )


class _single_conn_pool:
    """Lets a `Substrate` run on a connection the test controls (inside its transaction)."""

    def __init__(self, conn: psycopg.Connection[object]) -> None:
        self._conn = conn

    def connection(self) -> object:
        import contextlib

        return contextlib.nullcontext(self._conn)
