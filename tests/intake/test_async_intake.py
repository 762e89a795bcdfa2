"""AsyncSubstrateIntake: the same flows as the blocking intake, awaited."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest_asyncio

from substrate_db import AsyncSubstrate, JobState, WriteBackReason
from substrate_db._queries import rendered_queries
from substrate_db.intake import (
    AsyncSubstrateIntake,
    LocalTask,
    SkipReason,
    SQLiteTaskQueue,
    TickResult,
)

from .conftest import config_for, lines, no_password

MakeAsync = Callable[..., AsyncSubstrateIntake]


@pytest_asyncio.fixture
async def make_async(substrate_dsn: str, queue: SQLiteTaskQueue) -> AsyncIterator[MakeAsync]:
    made: list[AsyncSubstrateIntake] = []

    def make(*, local_queue: Any = None, **overrides: Any) -> AsyncSubstrateIntake:
        intake = AsyncSubstrateIntake(
            config_for(substrate_dsn, **overrides),
            queue if local_queue is None else local_queue,
            resolve_credential=no_password,
        )
        made.append(intake)
        return intake

    yield make
    for intake in made:
        await intake.close()


class AsyncQueue:
    """A local queue whose enqueue_task is a coroutine."""

    def __init__(self) -> None:
        self.tasks: list[LocalTask] = []

    async def enqueue_task(self, task: LocalTask) -> str:
        self.tasks.append(task)
        return f"a{len(self.tasks)}"


async def test_claim_to_local_task_to_complete(
    async_substrate: AsyncSubstrate, make_async: MakeAsync, queue: SQLiteTaskQueue, logs: Any
) -> None:
    job_id = await async_substrate.enqueue("email", {"subject": "hello"})
    intake = make_async()

    result = await intake.tick()

    assert result.claimed and result.job_id == job_id and result.local_task_id is not None
    taken = queue.take_next()
    assert taken is not None and taken.task.payload["idempotency_key"] == f"substrate-{job_id}-e1"
    written = await intake.write_back(taken.task, ok=True, result={"done": True})
    assert written is not None and written.ok
    job = await async_substrate.get_job(job_id)
    assert job is not None and job.state == JobState.COMPLETED
    assert lines(logs, logging.INFO) == [
        f"[substrate] claim slot=slot-a kinds=email result={job_id}",
        f"[substrate] complete jobs.id={job_id} epoch=1",
    ]


async def test_async_local_queue_and_empty_claim(
    async_substrate: AsyncSubstrate, make_async: MakeAsync, all_logs: Any
) -> None:
    local = AsyncQueue()
    intake = make_async(local_queue=local)
    assert await intake.tick() == TickResult()
    # The library's own lines: nothing at INFO or above. (psycopg_pool's chatter about the
    # intake's pool is demoted too, but on Python 3.11 the asyncio pool sometimes logs from
    # a task the filter cannot attribute, so it is not asserted here; the sync test is.)
    assert [
        r
        for r in all_logs.records
        if r.levelno >= logging.INFO and r.name.startswith("substrate_db")
    ] == []
    job_id = await async_substrate.enqueue("email", {})
    result = await intake.tick()
    assert result.local_task_id == "a1" and local.tasks[0].source == f"substrate:{job_id}"


async def test_skips(make_async: MakeAsync, dead_host: str, logs: Any) -> None:
    unreachable = make_async(host=dead_host, connect_timeout=0.5)
    assert (await unreachable.tick()).skip_reason == SkipReason.DB_UNREACHABLE

    def refuse(credential_id: str) -> str:
        raise PermissionError("not provisioned")

    no_secret = AsyncSubstrateIntake(unreachable.config, AsyncQueue(), resolve_credential=refuse)
    try:
        assert (await no_secret.tick()).skip_reason == SkipReason.CREDENTIAL_FAIL
    finally:
        await no_secret.close()
    assert [line.split(" error=")[0] for line in lines(logs, logging.WARNING)] == [
        "[substrate] skip reason=db-unreachable",
        "[substrate] skip reason=credential-fail",
    ]


async def test_job_parse_fail(async_substrate: AsyncSubstrate, make_async: MakeAsync) -> None:
    job_id = await async_substrate.enqueue("email", 42)
    result = await make_async().tick()
    assert (result.claimed, result.job_id, result.skip_reason) == (
        True,
        job_id,
        SkipReason.JOB_PARSE_FAIL,
    )


async def test_stale_write_back(
    async_substrate: AsyncSubstrate, make_async: MakeAsync, queue: SQLiteTaskQueue, logs: Any
) -> None:
    job_id = await async_substrate.enqueue("email", {})
    intake = make_async()
    assert (await intake.tick()).claimed
    taken = queue.take_next()
    assert taken is not None
    job = await async_substrate.get_job(job_id)
    assert job is not None and job.lease_expires_at is not None
    later = job.lease_expires_at + timedelta(seconds=1)
    await async_substrate.release_expired_leases(now=later)
    assert await async_substrate.claim_next_job("slot-b", ["email"], now=later) is not None

    result = await intake.write_back(taken.task, ok=True)

    assert result is not None and result.reason == WriteBackReason.STALE_EPOCH
    assert lines(logs, logging.WARNING) == [
        f"[substrate] complete-epoch-mismatch jobs.id={job_id} expected=1 actual=2 "
        "(stale executor, ignored)"
    ]


async def test_lease_recovery_owner_cadence_and_lock(
    async_substrate: AsyncSubstrate, make_async: MakeAsync, substrate_dsn: str, logs: Any
) -> None:
    await async_substrate.enqueue("email", {})
    job = await async_substrate.claim_next_job("slot-x", ["email"], lease_secs=60)
    assert job is not None
    later = job.lease_expires_at + timedelta(seconds=1)
    assert await make_async().lease_recovery_tick(now=later) is None  # not an owner

    owner = make_async(is_lease_recovery_owner=True)
    lock = rendered_queries("substrate")["try_recovery_lock"]
    other = await psycopg.AsyncConnection.connect(substrate_dsn, autocommit=True)
    async with other, other.transaction():
        await other.execute(lock.sql, {"schema": "substrate"})
        assert await owner.lease_recovery_tick(now=later) is None  # another owner runs
    assert await owner.lease_recovery_tick(now=later) is None  # within the cadence

    other_owner = make_async(is_lease_recovery_owner=True, slot_id="slot-b")
    result = await other_owner.lease_recovery_tick(now=later)
    assert result is not None and result.requeued_ids == (job.id,)
    assert lines(logs, logging.INFO) == ["[substrate] lease-recovery released=1"]


async def test_lease_keeper_from_the_intake(
    async_substrate: AsyncSubstrate, make_async: MakeAsync, queue: SQLiteTaskQueue
) -> None:
    await async_substrate.enqueue("email", {})
    intake = make_async(lease_secs=90)
    keeper = await intake.lease_keeper()
    assert keeper.interval == 30
    await intake.tick()
    taken = queue.take_next()
    assert taken is not None
    keeper.track(taken.task)
    assert await keeper.beat() == []
    await intake.write_back(taken.task, ok=False, error="boom")
    assert keeper.tracked() == []


async def test_async_context_manager_closes_the_pool(
    substrate_dsn: str, queue: SQLiteTaskQueue
) -> None:
    async with AsyncSubstrateIntake(
        config_for(substrate_dsn), queue, resolve_credential=no_password
    ) as intake:
        assert await intake.tick() == TickResult()
        pool = (await intake.client()).pool
    assert pool.closed
    assert (await intake.tick()).skip_reason == SkipReason.DB_ERROR
