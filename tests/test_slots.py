"""Slot liveness: beats with Postgres time, leases carried in the same round trip, a
heartbeat that never dies."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from substrate_db import (
    AsyncSlotHeartbeat,
    AsyncSubstrate,
    ConnectionFailed,
    SlotHeartbeat,
    SlotState,
    SlotStatus,
    Substrate,
    WriteBackReason,
)
from substrate_db.slots import beat_interval, clamp_interval, judge_failure


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_failure_policy() -> None:
    logged = [n for n in range(1, 41) if judge_failure(n).log]
    assert logged == [1, 2, 3, 10, 20, 30, 40]
    assert [n for n in range(1, 41) if judge_failure(n).reconnect] == [10, 20, 30, 40]
    assert (clamp_interval(1), clamp_interval(30), clamp_interval(9999)) == (5, 30, 300)
    assert beat_interval(30, lease_secs=60) == 20
    assert beat_interval(30, lease_secs=None) == 30


def test_beat_lands_with_postgres_time(substrate: Substrate) -> None:
    status = SlotStatus("slot-a", ["email", "sms"], interval_secs=10)
    before = substrate.db_now()
    hb = SlotHeartbeat(substrate, status)
    assert hb.beat() == []
    after = substrate.db_now()
    (slot,) = substrate.list_slots()
    assert slot.slot_id == "slot-a" and slot.kinds == ["email", "sms"]
    assert before <= slot.last_seen <= after
    assert (slot.state, slot.beats, slot.interval_secs) == (SlotState.HEALTHY, 1, 10)
    hb.beat()
    assert substrate.list_slots()[0].beats == 2
    hb.stop()
    assert substrate.list_slots()[0].state == SlotState.GONE


def test_wedged_round_trips_and_stale_is_derived(substrate: Substrate) -> None:
    status = SlotStatus("slot-w", interval_secs=5)
    hb = SlotHeartbeat(substrate, status)
    status.mark_wedged("model call stuck for 600 s")
    hb.beat()
    (slot,) = substrate.list_slots()
    assert (slot.state, slot.reason) == (SlotState.WEDGED, "model call stuck for 600 s")
    status.clear_wedged()
    hb.beat()
    (slot,) = substrate.list_slots()
    assert (slot.state, slot.reason) == (SlotState.HEALTHY, None)
    # Not seen for three intervals: stale, whatever it last reported.
    assert (
        substrate.list_slots(now=slot.last_seen + timedelta(seconds=14))[0].state
        == SlotState.HEALTHY
    )
    stale = substrate.list_slots(now=slot.last_seen + timedelta(seconds=16))[0]
    assert (stale.state, stale.reported_state) == (SlotState.STALE, SlotState.HEALTHY)
    assert substrate.prune_slots(now=slot.last_seen + timedelta(hours=23)) == 0
    assert substrate.prune_slots(now=slot.last_seen + timedelta(hours=25)) == 1
    assert substrate.list_slots() == []


def test_error_rate_and_in_flight(substrate: Substrate) -> None:
    status = SlotStatus("slot-e", ["k"])
    hb = SlotHeartbeat(substrate, status, lease_secs=60)
    substrate.enqueue_many([{"kind": "k"}, {"kind": "k"}])
    jobs = substrate.claim_jobs("slot-e", ["k"], 2)
    for job in jobs:
        hb.track(job)
    for ok in (True, True, False, True):
        status.record_outcome(ok)
    hb.beat()
    (slot,) = substrate.list_slots()
    assert slot.jobs_in_flight == 2 and slot.current_job == jobs[-1].id
    assert slot.error_rate == pytest.approx(0.25)


def test_beat_extends_leases_and_reports_lost_ones(substrate: Substrate) -> None:
    now = substrate.db_now()
    keep, lose = substrate.enqueue_many([{"kind": "k"}, {"kind": "k"}], now=now)
    jobs = {j.id: j for j in substrate.claim_jobs("slot-l", ["k"], 2, lease_secs=30, now=now)}
    lost: list[int] = []
    status = SlotStatus("slot-l", ["k"])
    hb = SlotHeartbeat(substrate, status, lease_secs=30, on_lost=lambda i, r: lost.append(i))
    events = {job.id: hb.track(job) for job in jobs.values()}
    hb.beat()
    kept = substrate.get_job(keep)
    assert kept is not None and kept.lease_expires_at is not None
    assert kept.lease_expires_at > jobs[keep].lease_expires_at
    # The other job is taken back and claimed by another slot.
    assert substrate.cancel_job(lose)
    results = hb.beat()
    assert [r.job_id for r in results] == [lose] and results[
        0
    ].reason == WriteBackReason.NOT_RUNNING
    assert lost == [lose] and hb.lost(lose) and not hb.lost(keep)
    assert events[lose].is_set() and not events[keep].is_set()
    assert hb.beat() == []  # reported once
    hb.untrack(lose)
    assert not hb.lost(lose) and hb.tracked() == [(keep, jobs[keep].claim_epoch)]


def test_heartbeat_thread_resumes_after_the_database_comes_back(
    substrate: Substrate, substrate_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(substrate_dsn)["dbname"]
    admin_dsn = psycopg.conninfo.make_conninfo(substrate_dsn, dbname="postgres")
    status = SlotStatus("slot-r", interval_secs=5)
    hb = SlotHeartbeat(substrate, status)
    hb._every = 0.05  # beat fast: this test is about the outage, not the interval
    caplog.set_level(logging.INFO, logger="substrate_db")

    def beats() -> int:
        try:
            slots = substrate.list_slots()
        except ConnectionFailed:  # the test's own pooled connection was cut too
            return -1
        return slots[0].beats if slots else 0

    with hb:
        _wait_for(lambda: beats() >= 2)
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            # A real outage for this database: new connections are refused and the
            # heartbeat's own connection is cut.
            admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(dbname))
            )
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid() AND application_name = ''",
                [dbname],
            )
            _wait_for(lambda: "slot-beat-failed slot=slot-r failures=3" in caplog.text)
            admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(dbname))
            )
        seen = beats()
        _wait_for(lambda: beats() > seen + 1)
        _wait_for(lambda: "slot-beat-recovered slot=slot-r" in caplog.text)
        assert hb._thread is not None and hb._thread.is_alive()
    failures = [r for r in caplog.records if "slot-beat-failed" in r.getMessage()]
    counts = [int(r.getMessage().split("failures=")[1].split()[0]) for r in failures]
    assert all(n <= 3 or n % 10 == 0 for n in counts)


def test_loop_restarts_after_a_crash(
    substrate: Substrate, caplog: pytest.LogCaptureFixture
) -> None:
    status = SlotStatus("slot-c", interval_secs=5)
    hb = SlotHeartbeat(substrate, status)
    hb._every = 0.05
    real = hb._beat_safely
    crashed = threading.Event()

    def crash_once() -> None:
        if not crashed.is_set():
            crashed.set()
            raise RuntimeError("bug in the loop")
        real()

    hb._beat_safely = crash_once  # type: ignore[method-assign]
    with hb:
        _wait_for(lambda: bool(substrate.list_slots()) and substrate.list_slots()[0].beats >= 2)
    assert "slot-heartbeat-restart slot=slot-c error=RuntimeError: bug in the loop" in caplog.text


async def test_async_heartbeat(async_substrate: AsyncSubstrate) -> None:
    job_id = await async_substrate.enqueue("k")
    job = await async_substrate.claim_next_job("slot-async", ["k"], 30)
    assert job is not None
    status = SlotStatus("slot-async", ["k"])
    lost: list[int] = []

    async def on_lost(job_id: int, _: object) -> None:
        lost.append(job_id)

    hb = AsyncSlotHeartbeat(async_substrate, status, lease_secs=30, on_lost=on_lost)
    event = hb.track(job)
    # Beats driven by hand (the task is not started, so it cannot report first).
    assert await hb.beat() == []
    (slot,) = await async_substrate.list_slots()
    assert slot.jobs_in_flight == 1
    await async_substrate.cancel_job(job_id)
    assert [r.job_id for r in await hb.beat()] == [job_id]
    assert lost == [job_id] and event.is_set()
    await hb.stop()
    assert (await async_substrate.list_slots())[0].state == SlotState.GONE


async def test_async_heartbeat_task_beats_until_stopped(async_substrate: AsyncSubstrate) -> None:
    status = SlotStatus("slot-task", ["k"])
    async with AsyncSlotHeartbeat(async_substrate, status) as hb:
        hb._every = 0.02
        for _ in range(500):
            slots = await async_substrate.list_slots()
            if slots and slots[0].beats >= 3:
                break
            await asyncio.sleep(0.01)
        assert slots[0].beats >= 3 and slots[0].state == SlotState.HEALTHY
    assert (await async_substrate.list_slots())[0].state == SlotState.GONE
