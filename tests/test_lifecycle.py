"""The job lifecycle end to end, blocking and asyncio, against a real Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from substrate_db import AsyncSubstrate, JobState, Substrate, WriteBackReason
from substrate_db._queries import load_migrations


def test_lifecycle_sync(substrate: Substrate) -> None:
    job_id = substrate.enqueue("email", {"to": "a@example.com"}, priority=2, max_attempts=3)
    job = substrate.get_job(job_id)
    assert job is not None
    assert (job.state, job.attempts, job.claim_epoch, job.payload) == (
        JobState.AVAILABLE,
        0,
        0,
        {"to": "a@example.com"},
    )

    claimed = substrate.claim_next_job("slot-1", ["email"], lease_secs=60)
    assert claimed is not None and claimed.id == job_id
    assert (claimed.claim_epoch, claimed.attempts, claimed.claimed_by) == (1, 1, "slot-1")
    assert claimed.idempotency_key == f"substrate-{job_id}-e1"
    running = substrate.get_job(job_id)
    assert running is not None and running.state == JobState.RUNNING
    assert running.lease_expires_at == claimed.lease_expires_at
    # The lease is measured by Postgres' clock.
    lease = claimed.lease_expires_at - running.updated_at
    assert lease == timedelta(seconds=60)

    extended = substrate.extend_lease(job_id, claimed.claim_epoch, 120)
    assert extended.ok and extended.lease_expires_at is not None
    assert extended.lease_expires_at > claimed.lease_expires_at

    done = substrate.complete_job(job_id, claimed.claim_epoch, {"sent": True})
    assert done.ok and done.reason == WriteBackReason.APPLIED and done.state == JobState.COMPLETED
    finished = substrate.get_job(job_id)
    assert finished is not None
    assert finished.state == JobState.COMPLETED
    assert finished.result == {"sent": True}
    assert finished.finished_at is not None and finished.lease_expires_at is None

    again = substrate.complete_job(job_id, claimed.claim_epoch, {"sent": "twice"})
    assert (again.ok, again.reason) == (False, WriteBackReason.NOT_RUNNING)
    after = substrate.get_job(job_id)
    assert after is not None and after.result == {"sent": True}
    assert substrate.claim_next_job("slot-1", ["email"]) is None


async def test_lifecycle_async(async_substrate: AsyncSubstrate) -> None:
    s = async_substrate
    job_id = await s.enqueue("email", {"n": 1})
    claimed = await s.claim_next_job("slot-a", ["email"], 30)
    assert claimed is not None and claimed.id == job_id
    assert (await s.extend_lease(job_id, claimed.claim_epoch, 30)).ok
    failed = await s.fail_job(job_id, claimed.claim_epoch, "boom", retry_in=0)
    assert failed.ok and failed.state == JobState.AVAILABLE
    again = await s.claim_next_job("slot-b", ["email"], 30)
    assert again is not None and again.claim_epoch == 2 and again.attempts == 2
    stale = await s.complete_job(job_id, claimed.claim_epoch, "late")
    assert stale.reason == WriteBackReason.STALE_EPOCH and stale.actual_epoch == 2
    assert (await s.complete_job(job_id, again.claim_epoch, [1, 2])).ok
    job = await s.get_job(job_id)
    assert job is not None and job.state == JobState.COMPLETED and job.result == [1, 2]
    assert job.last_error == "boom"
    ids = await s.enqueue_many([{"kind": "k"}, {"kind": "k", "priority": -1}])
    batch = await s.claim_jobs("slot-a", ["k"], 10)
    assert [j.id for j in batch] == [ids[1], ids[0]]
    results = await s.complete_jobs([(j.id, j.claim_epoch, None) for j in batch])
    assert all(r.ok for r in results)
    assert (await s.release_expired_leases()).released == 0
    assert await s.cancel_job(await s.enqueue("x")) is True
    assert len(await s.list_jobs(kind="k", state="completed")) == 2
    assert [m.version for m in await s.migration_status()] == [m.version for m in load_migrations()]


def test_claim_order_priority_run_at_id(substrate: Substrate) -> None:
    now = substrate.db_now()
    later = substrate.enqueue("k", priority=0, run_at=now - timedelta(seconds=1))
    first = substrate.enqueue("k", priority=-5, run_at=now)
    earliest = substrate.enqueue("k", priority=0, run_at=now - timedelta(seconds=10))
    same_a = substrate.enqueue("k", priority=0, run_at=now)
    same_b = substrate.enqueue("k", priority=0, run_at=now)
    last = substrate.enqueue("k", priority=32767, run_at=now - timedelta(days=1))
    expected = [first, earliest, later, same_a, same_b, last]
    got = []
    while (job := substrate.claim_next_job("s", ["k"], now=now + timedelta(seconds=1))) is not None:
        got.append(job.id)
    assert got == expected
    # The batch form hands jobs back in the same order.
    for job_id in expected:
        assert substrate.get_job(job_id) is not None


def test_batch_claim_order(substrate: Substrate) -> None:
    ids = substrate.enqueue_many([{"kind": "k", "priority": p} for p in (3, 1, 2, 1, -1)])
    jobs = substrate.claim_jobs("s", ["k"], 4)
    assert [j.id for j in jobs] == [ids[4], ids[1], ids[3], ids[2]]


def test_future_run_at_is_not_claimable_until_due(substrate: Substrate) -> None:
    now = substrate.db_now()
    job_id = substrate.enqueue("later", run_at=now + timedelta(hours=1))
    assert substrate.claim_next_job("s", ["later"]) is None
    assert substrate.claim_next_job("s", ["later"], now=now + timedelta(minutes=59)) is None
    job = substrate.claim_next_job("s", ["later"], now=now + timedelta(hours=1))
    assert job is not None and job.id == job_id


def test_only_requested_kinds_are_claimed(substrate: Substrate) -> None:
    substrate.enqueue("a")
    b = substrate.enqueue("b")
    job = substrate.claim_next_job("s", ["b", "c"])
    assert job is not None and job.id == b
    assert substrate.claim_next_job("s", ["c"]) is None


def test_dedupe_key_while_unfinished(substrate: Substrate) -> None:
    first = substrate.enqueue("sync", {"v": 1}, dedupe_key="user-7")
    assert substrate.enqueue("sync", {"v": 2}, dedupe_key="user-7") == first
    ids = substrate.enqueue_many(
        [
            {"kind": "sync", "dedupe_key": "user-7"},
            {"kind": "sync", "dedupe_key": "user-8"},
            {"kind": "sync", "dedupe_key": "user-8"},
            {"kind": "sync"},
        ]
    )
    assert ids[0] == first and ids[1] == ids[2] and len(set(ids)) == 3
    # Still deduplicated while running.
    job = substrate.claim_next_job("s", ["sync"])
    assert job is not None and job.id == first
    assert substrate.enqueue("sync", dedupe_key="user-7") == first
    # Once finished, the key can be used again.
    assert substrate.complete_job(job.id, job.claim_epoch).ok
    again = substrate.enqueue("sync", {"v": 3}, dedupe_key="user-7")
    assert again != first
    stored = substrate.get_job(first)
    assert stored is not None and stored.payload == {"v": 1}


def test_transactional_enqueue_rolls_back(substrate: Substrate, substrate_dsn: str) -> None:
    with psycopg.connect(substrate_dsn) as conn:
        with conn.transaction(force_rollback=True):
            job_id = substrate.enqueue("tx", {"a": 1}, conn=conn)
            ids = substrate.enqueue_many([{"kind": "tx"}], conn=conn)
            # Visible inside the transaction...
            assert conn.execute(
                "SELECT count(*) FROM substrate.jobs WHERE id = ANY(%s)", [[job_id, *ids]]
            ).fetchone() == (2,)
            # ...and to nobody else.
            assert substrate.get_job(job_id) is None
        assert substrate.get_job(job_id) is None
        with conn.transaction():
            committed = substrate.enqueue("tx", conn=conn)
    assert substrate.get_job(committed) is not None
    assert substrate.list_jobs(kind="tx") != []
    assert [j.id for j in substrate.list_jobs(kind="tx")] == [committed]


async def test_transactional_enqueue_async(
    async_substrate: AsyncSubstrate, substrate_dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(substrate_dsn) as conn:
        async with conn.transaction(force_rollback=True):
            job_id = await async_substrate.enqueue("tx", conn=conn)
        assert await async_substrate.get_job(job_id) is None


def test_retries_then_final_failure(substrate: Substrate) -> None:
    now = substrate.db_now()
    job_id = substrate.enqueue("flaky", max_attempts=3)
    for attempt in (1, 2):
        job = substrate.claim_next_job("s", ["flaky"], now=now + timedelta(days=attempt))
        assert job is not None and job.attempts == attempt
        result = substrate.fail_job(
            job.id, job.claim_epoch, f"try {attempt}", now=now + timedelta(days=attempt)
        )
        assert result.ok and result.state == JobState.AVAILABLE
        retried = substrate.get_job(job_id)
        assert retried is not None
        # Exponential backoff with jitter: 15 s + attempts^4 s, +-10%.
        delay = (retried.run_at - (now + timedelta(days=attempt))).total_seconds()
        base = 15 + attempt**4
        assert base * 0.9 - 0.01 <= delay <= base * 1.1 + 0.01
        assert retried.finished_at is None and retried.claimed_by is None
    job = substrate.claim_next_job("s", ["flaky"], now=now + timedelta(days=3))
    assert job is not None and job.attempts == 3
    result = substrate.fail_job(
        job.id, job.claim_epoch, ValueError("bad"), now=now + timedelta(days=3)
    )
    assert result.ok and result.state == JobState.FAILED
    final = substrate.get_job(job_id)
    assert final is not None and final.state == JobState.FAILED
    assert final.last_error == "ValueError: bad" and final.finished_at is not None
    assert substrate.claim_next_job("s", ["flaky"], now=now + timedelta(days=9)) is None


def test_retry_in_and_not_retryable(substrate: Substrate) -> None:
    now = substrate.db_now()
    a = substrate.enqueue("r", now=now)
    job = substrate.claim_next_job("s", ["r"], now=now)
    assert job is not None
    substrate.fail_job(job.id, job.claim_epoch, "later", retry_in=90, now=now)
    stored = substrate.get_job(a)
    assert stored is not None and stored.run_at == now + timedelta(seconds=90)
    job = substrate.claim_next_job("s", ["r"], now=now + timedelta(seconds=90))
    assert job is not None
    res = substrate.fail_job(job.id, job.claim_epoch, "fatal", retryable=False)
    assert res.state == JobState.FAILED


def test_cancel(substrate: Substrate) -> None:
    waiting = substrate.enqueue("c")
    running = substrate.enqueue("c")
    assert substrate.cancel_job(waiting) is True
    job = substrate.claim_next_job("s", ["c"])
    assert job is not None and job.id == running
    assert substrate.cancel_job(running) is True
    # The executor learns it at its next write-back or heartbeat.
    assert substrate.complete_job(running, job.claim_epoch).reason == WriteBackReason.NOT_RUNNING
    assert (
        substrate.extend_lease(running, job.claim_epoch, 30).reason == WriteBackReason.NOT_RUNNING
    )
    assert substrate.cancel_job(running) is False
    assert substrate.cancel_job(999_999) is False
    for job_id in (waiting, running):
        stored = substrate.get_job(job_id)
        assert stored is not None and stored.state == JobState.CANCELLED and stored.finished_at


def test_release_requeues_or_fails_spent_jobs(substrate: Substrate) -> None:
    now = substrate.db_now()
    keep = substrate.enqueue("l", max_attempts=2, now=now)
    spent = substrate.enqueue("l", max_attempts=1, now=now)
    jobs = substrate.claim_jobs("dead-slot", ["l"], 2, lease_secs=10, now=now)
    assert len(jobs) == 2
    assert substrate.release_expired_leases(now=now + timedelta(seconds=9)).released == 0
    result = substrate.release_expired_leases(now=now + timedelta(seconds=10))
    assert (result.requeued, result.failed, result.released) == (1, 1, 2)
    assert result.requeued_ids == (keep,) and result.failed_ids == (spent,)
    requeued = substrate.get_job(keep)
    assert requeued is not None and requeued.state == JobState.AVAILABLE
    # run_at unchanged: claimable at once.
    assert requeued.run_at <= now and requeued.claimed_by is None
    assert "dead-slot" in (requeued.last_error or "")
    failed = substrate.get_job(spent)
    assert failed is not None and failed.state == JobState.FAILED and failed.finished_at


def test_release_limit_and_paging(substrate: Substrate) -> None:
    now = substrate.db_now()
    substrate.enqueue_many([{"kind": "p"} for _ in range(25)], now=now)
    assert len(substrate.claim_jobs("s", ["p"], 25, lease_secs=1, now=now)) == 25
    later = now + timedelta(seconds=5)
    assert substrate.release_expired_leases(limit=10, now=later).released == 10
    from substrate_db import core
    from substrate_db._queries import rendered_queries
    from substrate_db.client import drive

    plan = core.release_expired_leases(rendered_queries("substrate"), None, later, page_size=4)
    with substrate.pool.connection() as conn:
        result = drive(conn, plan)
    assert result is not None and result.released == 15


def test_exclusive_recovery_stands_by_while_another_owner_works(
    substrate: Substrate, substrate_dsn: str
) -> None:
    now = substrate.db_now()
    substrate.enqueue("e", now=now)
    assert substrate.claim_next_job("s", ["e"], lease_secs=1, now=now) is not None
    with psycopg.connect(substrate_dsn) as other, other.transaction():
        other.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('substrate-recovery:' || %s, 0))",
            ["substrate"],
        )
        assert substrate.release_expired_leases_exclusive(now=now + timedelta(seconds=2)) is None
    result = substrate.release_expired_leases_exclusive(now=now + timedelta(seconds=2))
    assert result is not None and result.released == 1


def test_payload_values_round_trip(substrate: Substrate) -> None:
    for payload in ({"nested": {"a": [1, 2.5, None, True]}}, [1, "two"], "text", 7, None):
        job_id = substrate.enqueue("rt", payload)
        job = substrate.get_job(job_id)
        assert job is not None
        assert job.payload == ({} if payload is None else payload)


def test_run_at_in_other_timezone(substrate: Substrate) -> None:
    tz = datetime.now(UTC).astimezone().tzinfo
    when = datetime(2030, 1, 1, 12, 0, tzinfo=tz)
    job = substrate.get_job(substrate.enqueue("tz", run_at=when))
    assert job is not None and job.run_at == when


@pytest.mark.parametrize("schema", ["tenant_a", "Tenant_B"])
def test_custom_schema(substrate_dsn: str, schema: str) -> None:
    with Substrate.connect(substrate_dsn, schema=schema) as s:
        assert s.migrate() == [m.version for m in load_migrations()]
        job_id = s.enqueue("k")
        job = s.claim_next_job("s", ["k"])
        assert job is not None and job.id == job_id
        with s.pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = 'jobs'",
                [schema],
            ).fetchone()
        assert row == (1,)


def test_connect_takes_callable_kwargs(substrate_dsn: str) -> None:
    """psycopg_pool calls a kwargs callable for every new connection (how a rotated
    password is picked up); our own settings are merged into what it returns."""
    calls: list[int] = []

    def kwargs() -> dict[str, object]:
        calls.append(1)
        return {"application_name": "rotating"}

    with Substrate.connect(substrate_dsn, kwargs=kwargs) as s:
        assert s.enqueue("k") >= 1
        with s.pool.connection() as conn:
            assert conn.autocommit
            row = conn.execute("SHOW application_name").fetchone()
        assert row == ("rotating",)
    assert calls


PAYLOAD = {"text": "é ✓ 中文", "n": [1, 2.5, None, True], "nested": {"": ""}}


def test_payloads_round_trip_and_a_callers_configure_hook_still_runs(substrate_dsn: str) -> None:
    """Pools we build load JSON with our own loader (client._json_loads) and then run the
    caller's `configure`."""
    seen: list[object] = []
    with Substrate.connect(substrate_dsn, configure=seen.append) as s:
        job_id = s.enqueue("k", PAYLOAD)
        job = s.claim_next_job("s", ["k"])
        assert job is not None and job.id == job_id and job.payload == PAYLOAD
        assert s.complete_job(job.id, job.claim_epoch, result=PAYLOAD).ok
        stored = s.get_job(job_id)
        assert stored is not None and stored.result == PAYLOAD
    assert seen


async def test_async_payloads_round_trip_and_configure_hook(substrate_dsn: str) -> None:
    seen: list[object] = []

    async def hook(conn: object) -> None:
        seen.append(conn)

    async with await AsyncSubstrate.connect(substrate_dsn, configure=hook) as s:
        job_id = await s.enqueue("k", PAYLOAD)
        job = await s.claim_next_job("s", ["k"])
        assert job is not None and job.id == job_id and job.payload == PAYLOAD
    assert seen
