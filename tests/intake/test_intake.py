"""SubstrateIntake against a real Postgres and a real SQLite queue: every path of a tick,
of a write-back and of lease recovery, with the exact log lines."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from substrate_db import JobState, Substrate, WriteBackReason
from substrate_db._queries import rendered_queries
from substrate_db.errors import SubstrateError
from substrate_db.intake import (
    LocalTask,
    SkipReason,
    SQLiteTaskQueue,
    SubstrateConfig,
    SubstrateIntake,
    TickResult,
)

from .conftest import MakeIntake, lines

WARNING = logging.WARNING
INFO = logging.INFO


def db_now(substrate: Substrate) -> datetime:
    with substrate.pool.connection() as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def job_state(substrate: Substrate, job_id: int) -> JobState:
    job = substrate.get_job(job_id)
    assert job is not None
    return job.state


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the happy path ---------------------------------------------------------------------


def test_claim_to_local_task_to_complete(
    substrate: Substrate, make_intake: MakeIntake, queue: SQLiteTaskQueue, logs: Any
) -> None:
    job_id = substrate.enqueue("email", {"subject": "Welcome", "to": "ada@example.com"})
    intake = make_intake(kinds=["email", "sms"])

    result = intake.tick()

    assert result.claimed and result.skip_reason is None
    assert (result.job_id, result.claim_epoch) == (job_id, 1)
    assert result.local_task_id is not None
    task = queue.get_task(result.local_task_id)
    assert task == LocalTask(
        subject="Welcome",
        source=f"substrate:{job_id}",
        priority=1,
        max_attempts=1,
        payload={
            "subject": "Welcome",
            "to": "ada@example.com",
            "_substrate_job_id": job_id,
            "_substrate_claim_epoch": 1,
            "idempotency_key": f"substrate-{job_id}-e1",
        },
    )
    job = substrate.get_job(job_id)
    assert job is not None and job.state == JobState.RUNNING and job.claimed_by == "slot-a"
    # The intake does not renew leases by itself: the lease is the configured one.
    assert job.lease_expires_at is not None and job.lease_expires_at - job.updated_at == timedelta(
        seconds=300
    )

    taken = queue.take_next()
    assert taken is not None and taken.task == task
    queue.finish(taken.task_id, ok=True, result={"sent": 1})
    written = intake.write_back(taken.task, ok=True, result={"sent": 1})

    assert written is not None and written.ok
    done = substrate.get_job(job_id)
    assert done is not None and done.state == JobState.COMPLETED and done.result == {"sent": 1}
    assert lines(logs, INFO) == [
        f"[substrate] claim slot=slot-a kinds=email,sms result={job_id}",
        f"[substrate] complete jobs.id={job_id} epoch=1",
    ]


def test_a_failed_local_task_fails_the_job_for_a_retry(
    substrate: Substrate, make_intake: MakeIntake, queue: SQLiteTaskQueue, logs: Any
) -> None:
    job_id = substrate.enqueue("email", {"to": "x"})
    intake = make_intake()
    intake.tick()
    taken = queue.take_next()
    assert taken is not None

    written = intake.write_back(taken.task, ok=False, error="smtp down\n  (421)")

    assert written is not None and written.ok and written.state == JobState.AVAILABLE
    job = substrate.get_job(job_id)
    assert job is not None and job.last_error == "smtp down\n  (421)" and job.attempts == 1
    assert (
        lines(logs, INFO)[-1] == f"[substrate] fail jobs.id={job_id} epoch=1 reason=smtp down (421)"
    )


def test_an_exception_as_error(
    substrate: Substrate, make_intake: MakeIntake, queue: SQLiteTaskQueue, logs: Any
) -> None:
    job_id = substrate.enqueue("email", {})
    intake = make_intake()
    intake.tick()
    taken = queue.take_next()
    assert taken is not None
    intake.write_back(taken.task, ok=False, error=TimeoutError("no answer"))
    job = substrate.get_job(job_id)
    assert job is not None and job.last_error == "TimeoutError: no answer"
    assert lines(logs, INFO)[-1].endswith("reason=TimeoutError: no answer")


# -- ticks that hand nothing over -------------------------------------------------------


def test_an_empty_claim_is_silent(make_intake: MakeIntake, all_logs: Any) -> None:
    intake = make_intake()
    assert intake.tick() == TickResult()
    assert intake.tick() == TickResult()  # a warm pool too
    assert [r.getMessage() for r in all_logs.records if r.levelno >= INFO] == []
    assert "[substrate] claim slot=slot-a kinds=email result=none" in lines(all_logs)


def test_disabled_intake_does_nothing(queue: SQLiteTaskQueue, all_logs: Any) -> None:
    intake = SubstrateIntake(SubstrateConfig(), queue)
    assert intake.tick() == TickResult()
    task = LocalTask(subject="s", source="substrate:1", payload={"_substrate_job_id": 1})
    assert intake.write_back(task, ok=True) is None
    assert intake.lease_recovery_tick() is None
    assert intake._client is None  # no pool was ever built
    with pytest.raises(SubstrateError, match="disabled"):
        intake.lease_keeper()
    assert [r for r in all_logs.records if r.levelno >= INFO] == []
    intake.close()


def test_db_unreachable(make_intake: MakeIntake, dead_host: str, all_logs: Any) -> None:
    intake = make_intake(host=dead_host, connect_timeout=0.5)
    result = intake.tick()
    assert result == TickResult(skip_reason=SkipReason.DB_UNREACHABLE)
    assert result.skip_reason == "db-unreachable"  # a str
    [line] = lines(all_logs, WARNING)
    assert line.startswith("[substrate] skip reason=db-unreachable error=connection ")
    assert "No such file or directory" in line and "jobs.id" not in line
    # Told once: psycopg_pool's own warnings about the intake's pool are demoted to DEBUG.
    assert [r.name for r in all_logs.records if r.levelno >= WARNING] == ["substrate_db"]


def test_connect_timeout_bounds_a_tick_against_a_database_that_never_answers(
    make_intake: MakeIntake, hanging_host: str, logs: Any
) -> None:
    intake = make_intake(host=hanging_host, connect_timeout=0.5)
    assert intake.client().pool.timeout == 0.5
    started = time.monotonic()
    result = intake.tick()
    elapsed = time.monotonic() - started
    assert result.skip_reason == SkipReason.DB_UNREACHABLE
    # Far below the pool's 30 s default; loose on purpose (a busy machine is slow).
    assert elapsed < 20
    [line] = lines(logs, WARNING)
    assert line.startswith("[substrate] skip reason=db-unreachable error=")


def test_credential_fail_when_the_resolver_fails(make_intake: MakeIntake, logs: Any) -> None:
    def resolver(credential_id: str) -> str:
        raise LookupError(f"vault has no {credential_id}")

    intake = make_intake(resolve_credential=resolver, connect_timeout=0.5)
    result = intake.tick()
    assert result == TickResult(skip_reason=SkipReason.CREDENTIAL_FAIL)
    [line] = lines(logs, WARNING)
    assert line == (
        "[substrate] skip reason=credential-fail error=credential 'test-db': the resolver "
        "failed: LookupError: vault has no test-db"
    )


def test_a_first_tick_credential_failure_does_not_disable_intake(
    substrate: Substrate, make_intake: MakeIntake, logs: Any
) -> None:
    job_id = substrate.enqueue("email", {})
    vault: dict[str, str | None] = {}

    def resolver(credential_id: str) -> str | None:
        return vault[credential_id]  # KeyError until the secret is provisioned

    intake = make_intake(resolve_credential=resolver, connect_timeout=0.5)
    assert intake.tick().skip_reason == SkipReason.CREDENTIAL_FAIL
    vault["test-db"] = None  # provisioned (the trust server needs no password)
    result = intake.tick()
    assert result.claimed and result.job_id == job_id and result.skip_reason is None


def test_job_parse_fail_leaves_the_job_leased_for_lease_recovery(
    substrate: Substrate, make_intake: MakeIntake, queue: SQLiteTaskQueue, logs: Any
) -> None:
    job_id = substrate.enqueue("email", ["not", "an", "object"])
    intake = make_intake()

    result = intake.tick()

    assert result == TickResult(
        claimed=True, job_id=job_id, claim_epoch=1, skip_reason=SkipReason.JOB_PARSE_FAIL
    )
    assert queue.take_next() is None
    assert job_state(substrate, job_id) == JobState.RUNNING
    assert lines(logs, INFO) == [
        f"[substrate] claim slot=slot-a kinds=email result={job_id}",
        f"[substrate] skip reason=job-parse-fail error=expected the payload of job {job_id} "
        f"to be a JSON object, got: list jobs.id={job_id}",
    ]
    # Nobody renews the lease; recovery gives the job back once it expired.
    recovered = substrate.release_expired_leases(now=db_now(substrate) + timedelta(seconds=301))
    assert recovered.requeued_ids == (job_id,)


class BrokenQueue:
    def __init__(self, answer: Any = None, error: BaseException | None = None) -> None:
        self.answer = answer
        self.error = error

    def enqueue_task(self, task: LocalTask) -> Any:
        if self.error is not None:
            raise self.error
        return self.answer


@pytest.mark.parametrize(
    ("local_queue", "message"),
    [
        (BrokenQueue(error=OSError("disk full")), "OSError: disk full"),
        (BrokenQueue(answer=None), "TypeError: enqueue_task returned None instead of a task id"),
    ],
)
def test_local_enqueue_fail_leaves_the_job_leased(
    substrate: Substrate, make_intake: MakeIntake, logs: Any, local_queue: Any, message: str
) -> None:
    job_id = substrate.enqueue("email", {})
    intake = make_intake(local_queue=local_queue)
    result = intake.tick()
    assert result == TickResult(
        claimed=True, job_id=job_id, claim_epoch=1, skip_reason=SkipReason.LOCAL_ENQUEUE_FAIL
    )
    assert job_state(substrate, job_id) == JobState.RUNNING
    line = lines(logs, WARNING)[-1]
    assert line.startswith(f"[substrate] skip reason=local-enqueue-fail error={message}")
    assert line.endswith(f" jobs.id={job_id}")


def test_db_error_when_the_schema_is_missing(make_intake: MakeIntake, logs: Any) -> None:
    intake = make_intake(schema_name="not_migrated")
    assert intake.tick().skip_reason == SkipReason.DB_ERROR
    [line] = lines(logs, WARNING)
    assert line.startswith("[substrate] skip reason=db-error error=")
    assert "substrate-db migrate" in line


def test_a_tick_never_raises_but_lets_interrupts_through(
    substrate: Substrate, make_intake: MakeIntake, logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    intake = make_intake()
    monkeypatch.setattr("substrate_db.intake.adapter.tick_flow", broken)
    assert intake.tick() == TickResult(skip_reason=SkipReason.INTERNAL_ERROR)
    assert lines(logs, WARNING) == [
        "[substrate] skip reason=internal-error error=RuntimeError: a bug"
    ]
    monkeypatch.undo()

    substrate.enqueue("email", {})
    interrupted = make_intake(local_queue=BrokenQueue(error=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        interrupted.tick()


# -- write-back outcomes ----------------------------------------------------------------


def _claim_by_intake(
    substrate: Substrate, make_intake: MakeIntake, queue: SQLiteTaskQueue
) -> tuple[SubstrateIntake, int, LocalTask]:
    job_id = substrate.enqueue("email", {})
    intake = make_intake()
    assert intake.tick().claimed
    taken = queue.take_next()
    assert taken is not None
    return intake, job_id, taken.task


def test_stale_write_back_after_reclaim_is_ignored(
    substrate: Substrate, make_intake: MakeIntake, queue: SQLiteTaskQueue, logs: Any
) -> None:
    intake, job_id, task = _claim_by_intake(substrate, make_intake, queue)
    later = db_now(substrate) + timedelta(seconds=301)
    assert substrate.release_expired_leases(now=later).requeued_ids == (job_id,)
    reclaimed = substrate.claim_next_job("slot-b", ["email"], now=later)
    assert reclaimed is not None and reclaimed.claim_epoch == 2

    completed = intake.write_back(task, ok=True, result={"late": True})
    failed = intake.write_back(task, ok=False, error="late")

    assert completed is not None and completed.reason == WriteBackReason.STALE_EPOCH
    assert failed is not None and failed.reason == WriteBackReason.STALE_EPOCH
    job = substrate.get_job(job_id)
    assert job is not None and job.state == JobState.RUNNING and job.claimed_by == "slot-b"
    assert job.result is None and job.last_error is not None and "late" not in job.last_error
    assert lines(logs, WARNING) == [
        f"[substrate] complete-epoch-mismatch jobs.id={job_id} expected=1 actual=2 "
        "(stale executor, ignored)",
        f"[substrate] fail-failed jobs.id={job_id} epoch=1 reason=stale_epoch",
    ]


def test_write_back_to_a_pre_fencing_row(
    substrate: Substrate, make_intake: MakeIntake, logs: Any
) -> None:
    job_id = substrate.enqueue("email", {})
    with substrate.pool.connection() as conn:
        conn.execute(
            "UPDATE substrate.jobs SET state = 'running', claim_epoch = 0,"
            " lease_expires_at = now() + interval '5 minutes' WHERE id = %s",
            [job_id],
        )
    task = LocalTask(
        subject="s",
        source=f"substrate:{job_id}",
        payload={"_substrate_job_id": job_id, "_substrate_claim_epoch": 1},
    )
    result = make_intake().write_back(task, ok=True)
    assert result is not None and result.reason == WriteBackReason.PRE_FENCING
    assert lines(logs, WARNING) == [
        f"[substrate] complete-epoch-mismatch jobs.id={job_id} expected=1 actual=0 "
        "(pre-fencing row, ignored)"
    ]
    assert job_state(substrate, job_id) == JobState.RUNNING


def test_write_back_to_a_cancelled_job(
    substrate: Substrate, make_intake: MakeIntake, queue: SQLiteTaskQueue, logs: Any
) -> None:
    intake, job_id, task = _claim_by_intake(substrate, make_intake, queue)
    assert substrate.cancel_job(job_id)
    result = intake.write_back(task, ok=True)
    assert result is not None and result.reason == WriteBackReason.NOT_RUNNING
    assert lines(logs, WARNING) == [
        f"[substrate] complete-failed jobs.id={job_id} epoch=1 reason=not_running"
    ]


def test_a_transient_write_back_error_is_logged_and_swallowed(
    substrate: Substrate,
    make_intake: MakeIntake,
    queue: SQLiteTaskQueue,
    dead_host: str,
    logs: Any,
) -> None:
    _, job_id, task = _claim_by_intake(substrate, make_intake, queue)
    cut_off = make_intake(host=dead_host, connect_timeout=0.5)

    assert cut_off.write_back(task, ok=True, result={"x": 1}) is None

    [line] = lines(logs, WARNING)
    assert line.startswith("[substrate] write-back error=connection is bad: ")
    assert line.endswith(f" jobs.id={job_id}")
    assert job_state(substrate, job_id) == JobState.RUNNING
    # Lease recovery reconciles.
    later = db_now(substrate) + timedelta(seconds=301)
    assert substrate.release_expired_leases(now=later).requeued_ids == (job_id,)


@pytest.mark.parametrize(
    "task",
    [
        LocalTask(subject="cron", source="cron:nightly", payload={"_substrate_job_id": 1}),
        LocalTask(subject="x", source="substrate:1", payload={}),
    ],
)
def test_other_tasks_are_left_alone(
    make_intake: MakeIntake, all_logs: Any, task: LocalTask
) -> None:
    intake = make_intake()
    assert intake.write_back(task, ok=True) is None
    assert intake._client is None  # not even a pool
    assert [r for r in all_logs.records if r.levelno >= INFO] == []


# -- lease recovery ---------------------------------------------------------------------


def _expired_job(substrate: Substrate) -> tuple[int, datetime]:
    """A running job (of a kind of its own) and a `now` at which its lease has expired."""
    kind = f"k{time.monotonic_ns()}"
    job_id = substrate.enqueue(kind, {})
    claimed = substrate.claim_next_job("slot-x", [kind], lease_secs=60)
    assert claimed is not None and claimed.id == job_id
    return job_id, db_now(substrate) + timedelta(seconds=61)


def test_only_the_owner_recovers(substrate: Substrate, make_intake: MakeIntake) -> None:
    job_id, later = _expired_job(substrate)
    assert make_intake().lease_recovery_tick(now=later) is None
    assert job_state(substrate, job_id) == JobState.RUNNING
    result = make_intake(is_lease_recovery_owner=True).lease_recovery_tick(now=later)
    assert result is not None and result.requeued_ids == (job_id,)
    assert job_state(substrate, job_id) == JobState.AVAILABLE


def test_recovery_runs_at_most_once_per_cadence(
    substrate: Substrate, make_intake: MakeIntake, logs: Any
) -> None:
    clock = FakeClock()
    owner = make_intake(is_lease_recovery_owner=True, lease_recovery_cadence_secs=60, clock=clock)
    _, later = _expired_job(substrate)
    result = owner.lease_recovery_tick(now=later)
    assert result is not None and result.released == 1

    second, later = _expired_job(substrate)
    clock.now += 59
    assert owner.lease_recovery_tick(now=later) is None  # within the cadence
    assert job_state(substrate, second) == JobState.RUNNING
    clock.now += 1
    result = owner.lease_recovery_tick(now=later)
    assert result is not None and result.requeued_ids == (second,)

    clock.now += 60
    empty = owner.lease_recovery_tick(now=later)
    assert empty is not None and empty.released == 0
    assert lines(logs, INFO) == [
        "[substrate] lease-recovery released=1",
        "[substrate] lease-recovery released=1",
    ]  # nothing for the run that released 0


def test_two_owners_never_recover_at_once(
    substrate: Substrate, substrate_dsn: str, make_intake: MakeIntake, logs: Any
) -> None:
    owner_a = make_intake(is_lease_recovery_owner=True, slot_id="slot-a")
    owner_b = make_intake(is_lease_recovery_owner=True, slot_id="slot-b")
    job_id, later = _expired_job(substrate)
    lock = rendered_queries("substrate")["try_recovery_lock"]

    # Another owner is mid-run: it holds the transaction-scoped recovery lock.
    with psycopg.connect(substrate_dsn, autocommit=True) as other, other.transaction():
        row = other.execute(lock.sql, {"schema": "substrate"}).fetchone()
        assert row is not None and row[0] is True
        assert owner_a.lease_recovery_tick(now=later) is None
        assert job_state(substrate, job_id) == JobState.RUNNING
        assert "[substrate] lease-recovery skipped reason=another-owner-running" in lines(logs)

    # The lock ends with that transaction: the next owner runs.
    result = owner_b.lease_recovery_tick(now=later)
    assert result is not None and result.requeued_ids == (job_id,)


def test_a_recovery_error_is_logged_and_swallowed(
    make_intake: MakeIntake, dead_host: str, logs: Any
) -> None:
    owner = make_intake(is_lease_recovery_owner=True, host=dead_host, connect_timeout=0.5)
    assert owner.lease_recovery_tick() is None
    [line] = lines(logs, WARNING)
    assert line.startswith("[substrate] lease-recovery error=connection is bad: ")


def test_intake_as_context_manager(substrate_dsn: str, queue: SQLiteTaskQueue) -> None:
    from .conftest import config_for, no_password

    with SubstrateIntake(config_for(substrate_dsn), queue, resolve_credential=no_password) as it:
        assert it.tick() == TickResult()
        pool = it.client().pool
    assert pool.closed
    assert it.tick().skip_reason == SkipReason.DB_ERROR  # closed: refused, not raised
