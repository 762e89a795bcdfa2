"""LeaseKeeper and AsyncLeaseKeeper: batched renewals, lost leases, surviving errors."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from substrate_db import AsyncSubstrate, ClaimedJob, Substrate, WriteBackReason, WriteBackResult
from substrate_db.errors import ConnectionFailed, InvalidArgument
from substrate_db.intake import AsyncLeaseKeeper, LeaseKeeper, LocalTask, SQLiteTaskQueue

from .conftest import MakeIntake, lines


def db_now(substrate: Substrate) -> datetime:
    with substrate.pool.connection() as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def claim(substrate: Substrate, kind: str = "email", lease_secs: int = 60) -> ClaimedJob:
    substrate.enqueue(kind, {})
    job = substrate.claim_next_job("slot-a", [kind], lease_secs=lease_secs)
    assert job is not None
    return job


def steal(substrate: Substrate, job: ClaimedJob, kind: str = "email") -> datetime:
    """Let `job`'s lease expire, recover it and claim it again from another slot."""
    later = job.lease_expires_at + timedelta(seconds=1)
    assert job.id in substrate.release_expired_leases(now=later).requeued_ids
    again = substrate.claim_next_job("slot-b", [kind], now=later)
    assert again is not None and again.id == job.id
    return later


class CountingSubstrate(Substrate):
    """A Substrate on the same pool that counts `extend_leases` calls and can fail them."""

    def __init__(self, base: Substrate, failures: int = 0) -> None:
        super().__init__(base.pool)
        self.calls: list[list[tuple[int, int]]] = []
        self.failures = failures

    def extend_leases(self, jobs: Any, lease_secs: int, *, now: datetime | None = None) -> Any:
        self.calls.append(list(jobs))
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionFailed("the network blinked")
        return super().extend_leases(jobs, lease_secs, now=now)


def test_interval_is_a_third_of_the_lease(substrate: Substrate) -> None:
    assert LeaseKeeper(substrate, 300).interval == 100
    assert LeaseKeeper(substrate, 300, interval=5).interval == 5
    with pytest.raises(InvalidArgument, match="lease_secs"):
        LeaseKeeper(substrate, 0)
    with pytest.raises(InvalidArgument, match="interval"):
        LeaseKeeper(substrate, 30, interval=0)


def test_one_beat_extends_every_tracked_lease_in_one_statement(substrate: Substrate) -> None:
    jobs = [claim(substrate) for _ in range(3)]
    counting = CountingSubstrate(substrate)
    keeper = LeaseKeeper(counting, 60)
    for job in jobs:
        keeper.track(job)
    at = db_now(substrate) + timedelta(seconds=30)

    assert keeper.beat(now=at) == []

    assert counting.calls == [sorted((j.id, j.claim_epoch) for j in jobs)]
    for job in jobs:
        row = substrate.get_job(job.id)
        assert row is not None and row.lease_expires_at == at + timedelta(seconds=60)


def test_track_accepts_jobs_tasks_and_pairs(substrate: Substrate) -> None:
    keeper = LeaseKeeper(substrate, 60)
    task = LocalTask(
        subject="s",
        source="substrate:7",
        payload={"_substrate_job_id": 7, "_substrate_claim_epoch": 2},
    )
    keeper.track(task)
    keeper.track((8, 1))
    assert sorted(keeper.tracked()) == [(7, 2), (8, 1)]
    with pytest.raises(InvalidArgument, match="expected job to be a ClaimedJob"):
        keeper.track(LocalTask(subject="s", source="cron"))
    with pytest.raises(InvalidArgument):
        keeper.track((8, True))


def test_a_lost_lease_is_reported_once(substrate: Substrate, logs: Any) -> None:
    job = claim(substrate)
    reported: list[tuple[int, WriteBackResult]] = []
    counting = CountingSubstrate(substrate)
    keeper = LeaseKeeper(counting, 60, on_lost=lambda job_id, r: reported.append((job_id, r)))
    event = keeper.track(job)
    later = steal(substrate, job)

    lost = keeper.beat(now=later)

    assert [r.reason for r in lost] == [WriteBackReason.STALE_EPOCH]
    assert keeper.lost(job.id) and event.is_set()
    assert keeper.lost_event(job.id) is event
    assert [(j, r.reason, r.actual_epoch) for j, r in reported] == [
        (job.id, WriteBackReason.STALE_EPOCH, 2)
    ]
    assert lines(logs, logging.WARNING) == [
        f"[substrate] lease-lost jobs.id={job.id} epoch=1 reason=stale_epoch"
    ]
    # A lost lease is not renewed again, nor reported again.
    assert keeper.beat(now=later) == []
    assert len(counting.calls) == 1 and len(reported) == 1
    # The new owner's lease was never touched by the stale keeper.
    row = substrate.get_job(job.id)
    assert row is not None and row.claimed_by == "slot-b"
    assert row.lease_expires_at == later + timedelta(seconds=300)
    keeper.untrack(job.id)
    assert not keeper.lost(job.id) and keeper.tracked() == []


def test_a_cancelled_job_is_lost_too(substrate: Substrate) -> None:
    job = claim(substrate)
    keeper = LeaseKeeper(substrate, 60)
    keeper.track(job)
    substrate.cancel_job(job.id)
    assert [r.reason for r in keeper.beat()] == [WriteBackReason.NOT_RUNNING]


def test_a_keeper_survives_database_errors(substrate: Substrate, logs: Any) -> None:
    job = claim(substrate)
    flaky = CountingSubstrate(substrate, failures=2)
    keeper = LeaseKeeper(flaky, 60)
    keeper.track(job)
    at = db_now(substrate)

    assert keeper.beat(now=at) == [] and keeper.beat(now=at) == []
    assert keeper.beat(now=at) == []  # the third one gets through

    assert lines(logs, logging.WARNING) == [
        "[substrate] lease-keeper error=the network blinked",
        "[substrate] lease-keeper error=the network blinked",
    ]
    row = substrate.get_job(job.id)
    assert row is not None and row.lease_expires_at == at + timedelta(seconds=60)
    assert not keeper.lost(job.id)


def test_the_thread_beats_and_reports_a_lost_lease(substrate: Substrate) -> None:
    job = claim(substrate, lease_secs=60)
    reported = threading.Event()
    flaky = CountingSubstrate(substrate, failures=1)
    # Extensions use the real clock: a fresh 60 s lease each beat, until the job is stolen.
    with LeaseKeeper(flaky, 60, interval=0.02, on_lost=lambda *_: reported.set()) as keeper:
        event = keeper.track(job)
        deadline = time.monotonic() + 10
        while len(flaky.calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(flaky.calls) >= 3  # it kept beating after the failed beat
        substrate.cancel_job(job.id)
        assert event.wait(timeout=10) and reported.wait(timeout=10)
        assert keeper.running
    assert not keeper.running


def test_a_failing_callback_does_not_stop_the_keeper(substrate: Substrate, logs: Any) -> None:
    job = claim(substrate)

    def on_lost(job_id: int, result: WriteBackResult) -> None:
        raise ValueError("runtime bug")

    keeper = LeaseKeeper(substrate, 60, on_lost=on_lost)
    keeper.track(job)
    substrate.cancel_job(job.id)
    assert len(keeper.beat()) == 1
    assert lines(logs, logging.ERROR) == [
        "[substrate] callback-error callback=on_lost error=runtime bug"
    ]


def test_write_back_untracks_the_job_from_the_intakes_keepers(
    substrate: Substrate, make_intake: MakeIntake, queue: SQLiteTaskQueue
) -> None:
    substrate.enqueue("email", {})
    intake = make_intake()
    keeper = intake.lease_keeper()
    assert keeper.lease_secs == 300 and keeper.interval == 100
    intake.tick()
    taken = queue.take_next()
    assert taken is not None
    keeper.track(taken.task)
    assert len(keeper.tracked()) == 1
    written = intake.write_back(taken.task, ok=True)
    assert written is not None and written.ok
    assert keeper.tracked() == [] and keeper.beat() == []


async def test_async_keeper(async_substrate: AsyncSubstrate, logs: Any) -> None:
    await async_substrate.enqueue("email", {})
    job = await async_substrate.claim_next_job("slot-a", ["email"], lease_secs=60)
    assert job is not None
    reported: list[int] = []

    async def on_lost(job_id: int, result: WriteBackResult) -> None:
        reported.append(job_id)

    keeper = AsyncLeaseKeeper(async_substrate, 60, interval=0.02, on_lost=on_lost)
    event = keeper.track(job)
    assert isinstance(event, asyncio.Event)
    at = job.lease_expires_at
    assert await keeper.beat(now=at) == []
    row = await async_substrate.get_job(job.id)
    assert row is not None and row.lease_expires_at == at + timedelta(seconds=60)

    async with keeper:
        assert keeper.running
        await async_substrate.cancel_job(job.id)
        await asyncio.wait_for(event.wait(), timeout=10)
    assert not keeper.running
    assert reported == [job.id] and keeper.lost(job.id)
    assert f"[substrate] lease-lost jobs.id={job.id} epoch=1 reason=not_running" in lines(logs)


def test_intake_slot_heartbeat_carries_the_task_lease(
    substrate: Substrate, queue: SQLiteTaskQueue, make_intake: Any
) -> None:
    """The intake beats through a SlotHeartbeat: the slot's row and the task's lease in
    one round trip; write_back stops the renewals first."""
    substrate.enqueue("email", {})
    intake = make_intake()
    heartbeat = intake.slot_heartbeat(interval_secs=30)
    assert heartbeat.lease_secs == 300
    intake.tick()
    taken = queue.take_next()
    assert taken is not None
    event = heartbeat.track(taken.task)  # the LocalTask itself
    (job_id, epoch) = heartbeat.tracked()[0]
    assert heartbeat.beat() == [] and not event.is_set()
    (slot,) = substrate.list_slots()
    assert (slot.slot_id, slot.jobs_in_flight, slot.current_job) == (
        intake.config.slot_id,
        1,
        job_id,
    )
    assert intake.write_back(taken.task, ok=True) is not None
    assert heartbeat.tracked() == []
    intake.close()
    assert substrate.list_slots()[0].state == "gone"
    assert epoch == 1
