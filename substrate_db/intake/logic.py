"""The intake's decisions, without I/O: one copy for the blocking and the asyncio adapter.

Like `substrate_db.core`, each operation is a *flow*: a generator that yields the
operations it needs done (`Claim`, `Enqueue`, `Complete`, `Fail`, `Recover`, `Untrack`),
receives their results, or has their exception thrown into it, and returns the outcome.
`SubstrateIntake` and `AsyncSubstrateIntake` only perform the operations, blocking or
awaited; everything else (mapping a job to a `LocalTask`, choosing a skip reason,
deciding what a write-back does, which log line says what) is decided here, once.

Flows log through `loglines` (formatting) and the `substrate_db` logger; logging is the
only side effect they have.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from .. import loglines
from ..errors import ConnectionFailed, SubstrateError
from ..models import ClaimedJob, JsonValue, RecoveryResult, WriteBackReason, WriteBackResult
from ._connect import ConnectFailure, ConnectTracker, one_line
from .config import SubstrateConfig
from .credentials import CredentialError
from .tasks import (
    PAYLOAD_CLAIM_EPOCH,
    PAYLOAD_IDEMPOTENCY_KEY,
    PAYLOAD_JOB_ID,
    RESERVED_PAYLOAD_KEYS,
    SOURCE_PREFIX,
    LocalTask,
)

T = TypeVar("T")
log = loglines.logger

# -- results ---------------------------------------------------------------------------


class SkipReason(StrEnum):
    """Why a tick handed no job to the local queue (`TickResult.skip_reason`)."""

    CREDENTIAL_FAIL = "credential-fail"
    """The credential could not be resolved, or the server refused it (after one retry
    with a freshly resolved password)."""
    DB_UNREACHABLE = "db-unreachable"
    """No connection within `connect_timeout`, or the connection broke."""
    JOB_PARSE_FAIL = "job-parse-fail"
    """A job was claimed but cannot become a local task; it stays leased."""
    LOCAL_ENQUEUE_FAIL = "local-enqueue-fail"
    """A job was claimed but the local queue refused it; it stays leased."""
    DB_ERROR = "db-error"
    """(added) The database answered with an error: schema not migrated, permission
    denied, ... Connectivity is fine; the setup is not."""
    INTERNAL_ERROR = "internal-error"
    """(added) A bug in the intake; logged with its traceback."""


class TickResult(BaseModel):
    """What one `tick()` did. `claimed` with a `skip_reason` means the job was claimed
    but not handed over: it stays leased until lease recovery takes it back."""

    model_config = ConfigDict(frozen=True)

    claimed: bool = False
    job_id: int | None = None
    claim_epoch: int | None = None
    local_task_id: str | None = None
    skip_reason: SkipReason | None = None


# -- operations a flow asks for --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """`claim_next_job(slot_id, kinds, lease_secs)`: a `ClaimedJob` or None back."""

    slot_id: str
    kinds: tuple[str, ...]
    lease_secs: int


@dataclass(frozen=True, slots=True)
class Enqueue:
    """`local_queue.enqueue_task(task)`: the local task id back."""

    task: LocalTask


@dataclass(frozen=True, slots=True)
class Complete:
    """`complete_job(job_id, epoch, result)`: a `WriteBackResult` back."""

    job_id: int
    epoch: int
    result: JsonValue


@dataclass(frozen=True, slots=True)
class Fail:
    """`fail_job(job_id, epoch, error)` (retryable: the substrate owns retries)."""

    job_id: int
    epoch: int
    error: str


@dataclass(frozen=True, slots=True)
class Recover:
    """`release_expired_leases_exclusive(now=now)`: a `RecoveryResult`, or None when
    another owner holds the lock."""

    now: datetime | None


@dataclass(frozen=True, slots=True)
class Untrack:
    """Stop the intake's lease keepers renewing this job (before its write-back, so a
    beat racing the write-back cannot report a finished job as lost)."""

    job_id: int


Op = Claim | Enqueue | Complete | Fail | Recover | Untrack
Flow = Generator[Op, Any, T]

# -- jobs to local tasks ---------------------------------------------------------------


class JobParseError(ValueError):
    """A claimed job cannot be turned into a local task."""


def task_from_job(job: ClaimedJob) -> LocalTask:
    """The local task for a claimed job (see `LocalTask` for the field rules)."""
    payload = job.payload
    if not isinstance(payload, dict):
        raise JobParseError(
            f"expected the payload of job {job.id} to be a JSON object, "
            f"got: {type(payload).__name__}"
        )
    reserved = [key for key in RESERVED_PAYLOAD_KEYS if key in payload]
    if reserved:
        raise JobParseError(
            f"the payload of job {job.id} carries the reserved key(s) {reserved}, which the "
            "intake sets itself"
        )
    subject = payload.get("subject", job.kind)
    if not isinstance(subject, str) or not subject.strip():
        raise JobParseError(
            f"expected payload.subject of job {job.id} to be a non-empty string, "
            f"got: {loglines.text(repr(subject))}"
        )
    return LocalTask(
        subject=subject,
        source=f"{SOURCE_PREFIX}{job.id}",
        priority=1,
        max_attempts=1,
        payload={
            **payload,
            PAYLOAD_JOB_ID: job.id,
            PAYLOAD_CLAIM_EPOCH: job.claim_epoch,
            PAYLOAD_IDEMPOTENCY_KEY: job.idempotency_key,
        },
    )


# -- the tick --------------------------------------------------------------------------


def _connect_failure(exc: BaseException, tracker: ConnectTracker | None) -> ConnectFailure | None:
    """Why no connection came, when `exc` is a connection failure and the tracker knows:
    a pool timeout hides the cause, the tracker saw it."""
    if isinstance(exc, ConnectionFailed) and tracker is not None:
        return tracker.last
    return None


def explain(exc: BaseException, tracker: ConnectTracker | None) -> str:
    """The message for an operation that raised: the cause of a connection failure when
    it is known, else the exception's own text (with its type when it is not ours)."""
    failure = _connect_failure(exc, tracker)
    if failure is not None:
        return failure.message
    if isinstance(exc, SubstrateError):
        return one_line(exc)
    return f"{type(exc).__name__}: {one_line(exc)}"


def classify(exc: BaseException, tracker: ConnectTracker | None) -> tuple[SkipReason, str]:
    """The skip reason and the message for a claim that raised."""
    message = explain(exc, tracker)
    if isinstance(exc, CredentialError):
        return SkipReason.CREDENTIAL_FAIL, message
    failure = _connect_failure(exc, tracker)
    if failure is not None and failure.kind == "credential":
        return SkipReason.CREDENTIAL_FAIL, message
    if isinstance(exc, ConnectionFailed):
        return SkipReason.DB_UNREACHABLE, message
    return SkipReason.DB_ERROR, message


def tick_flow(config: SubstrateConfig, tracker: ConnectTracker | None) -> Flow[TickResult]:
    """Claim one job, turn it into a local task and enqueue it; never raises."""
    if not config.enabled:
        return TickResult()
    assert config.slot_id is not None  # guaranteed by SubstrateConfig when enabled
    try:
        job: ClaimedJob | None = yield Claim(config.slot_id, config.kinds, config.lease_secs)
    except Exception as exc:
        reason, message = classify(exc, tracker)
        log.warning(loglines.skip(reason, message))
        return TickResult(skip_reason=reason)
    if job is None:
        log.debug(loglines.claim_none(config.slot_id, config.kinds))
        return TickResult()
    log.info(loglines.claim(config.slot_id, config.kinds, job.id))
    # From here on the job is ours and leased: on a failure it stays leased and lease
    # recovery gives it back once the lease expires (nobody renews it).
    try:
        task = task_from_job(job)
    except Exception as exc:
        log.warning(loglines.skip(SkipReason.JOB_PARSE_FAIL, exc, job.id))
        return _claimed(job, skip_reason=SkipReason.JOB_PARSE_FAIL)
    try:
        task_id = yield Enqueue(task)
        if not isinstance(task_id, str) or not task_id:
            raise TypeError(f"enqueue_task returned {task_id!r} instead of a task id (a str)")
    except Exception as exc:
        log.warning(loglines.skip(SkipReason.LOCAL_ENQUEUE_FAIL, explain(exc, None), job.id))
        return _claimed(job, skip_reason=SkipReason.LOCAL_ENQUEUE_FAIL)
    return _claimed(job, local_task_id=task_id)


def _claimed(
    job: ClaimedJob, *, local_task_id: str | None = None, skip_reason: SkipReason | None = None
) -> TickResult:
    return TickResult(
        claimed=True,
        job_id=job.id,
        claim_epoch=job.claim_epoch,
        local_task_id=local_task_id,
        skip_reason=skip_reason,
    )


def tick_crashed(exc: Exception) -> TickResult:
    """The result of a tick whose flow itself raised: a bug, logged with its traceback."""
    log.error(
        loglines.skip(SkipReason.INTERNAL_ERROR, f"{type(exc).__name__}: {one_line(exc)}"),
        exc_info=exc,
    )
    return TickResult(skip_reason=SkipReason.INTERNAL_ERROR)


# -- write-back ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteBackTarget:
    """The job a local task writes back to, and the epoch that fences the write."""

    job_id: int
    epoch: int


def _positive_int(value: object, low: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and value >= low else None


def write_back_target(task: LocalTask) -> WriteBackTarget | str:
    """The write-back target of a task, or why the task is left alone (a short reason)."""
    if not task.source.startswith(SOURCE_PREFIX):
        return "not-from-substrate"
    if PAYLOAD_JOB_ID not in task.payload:
        return f"missing-{PAYLOAD_JOB_ID}"
    job_id = _positive_int(task.payload[PAYLOAD_JOB_ID], 1)
    if job_id is None:
        return f"bad-{PAYLOAD_JOB_ID}"
    if task.source != f"{SOURCE_PREFIX}{job_id}":
        return f"source-disagrees-with-{PAYLOAD_JOB_ID}"
    epoch = _positive_int(task.payload.get(PAYLOAD_CLAIM_EPOCH), 1)
    if epoch is None:
        return f"missing-or-bad-{PAYLOAD_CLAIM_EPOCH}"
    return WriteBackTarget(job_id, epoch)


def error_text(error: object) -> str:
    """The error recorded for a failed local task."""
    if error is None:
        return "local task failed"
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


def describe_write_back(ok: bool, result: WriteBackResult, error: str) -> tuple[int, str]:
    """The level and the log line for the outcome of a write-back."""
    if result.ok:
        if ok:
            return logging.INFO, loglines.complete(result.job_id, result.expected_epoch)
        return logging.INFO, loglines.fail(result.job_id, result.expected_epoch, error)
    reason = str(result.reason)
    if not ok:
        return logging.WARNING, loglines.fail_failed(result.job_id, result.expected_epoch, reason)
    if result.reason in (WriteBackReason.STALE_EPOCH, WriteBackReason.PRE_FENCING):
        actual = result.actual_epoch or 0
        return logging.WARNING, loglines.complete_epoch_mismatch(
            result.job_id, result.expected_epoch, actual
        )
    return logging.WARNING, loglines.complete_failed(result.job_id, result.expected_epoch, reason)


def write_back_flow(
    task: LocalTask, ok: bool, result: JsonValue, error: object, tracker: ConnectTracker | None
) -> Flow[WriteBackResult | None]:
    """Complete or fail the task's job, fenced on the task's epoch; never raises.

    Returns the write-back result, or None when the task was left alone or the write
    raised (logged; lease recovery reconciles the job).
    """
    target = write_back_target(task)
    if isinstance(target, str):
        log.debug(loglines.write_back_ignored(task.source, target))
        return None
    message = error_text(error)
    yield Untrack(target.job_id)
    try:
        if ok:
            outcome: WriteBackResult = yield Complete(target.job_id, target.epoch, result)
        else:
            outcome = yield Fail(target.job_id, target.epoch, message)
    except Exception as exc:
        log.warning(loglines.write_back_error(explain(exc, tracker), target.job_id))
        return None
    level, line = describe_write_back(ok, outcome, message)
    log.log(level, line)
    return outcome


def write_back_crashed(task: LocalTask, exc: Exception) -> None:
    """Log a write-back whose flow itself raised (a bug), with its traceback."""
    target = write_back_target(task)
    job_id = "unknown" if isinstance(target, str) else target.job_id
    log.error(
        loglines.write_back_error(f"{type(exc).__name__}: {one_line(exc)}", job_id), exc_info=exc
    )


def recovery_crashed(exc: Exception) -> None:
    """Log a lease-recovery tick whose flow itself raised (a bug), with its traceback."""
    log.error(loglines.lease_recovery_error(f"{type(exc).__name__}: {one_line(exc)}"), exc_info=exc)


# -- lease recovery --------------------------------------------------------------------


class RecoveryGate:
    """At most one lease-recovery run per cadence, measured on a monotonic clock."""

    def __init__(self, cadence_secs: float, clock: Callable[[], float]) -> None:
        self._cadence = cadence_secs
        self._clock = clock
        self._next_at: float | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        """True (and the next run pushed a cadence away) when a run may start now."""
        with self._lock:
            now = self._clock()
            if self._next_at is not None and now < self._next_at:
                return False
            # Counted from the attempt, not its success: a failing database is tried
            # again a cadence later, not at every tick.
            self._next_at = now + self._cadence
            return True


def recovery_flow(
    config: SubstrateConfig,
    gate: RecoveryGate,
    now: datetime | None,
    tracker: ConnectTracker | None,
) -> Flow[RecoveryResult | None]:
    """Release expired leases, on the owner only, at most once per cadence, one owner at
    a time (a transaction-scoped advisory lock); never raises. None: nothing was done."""
    if not (config.enabled and config.is_lease_recovery_owner) or not gate.due():
        return None
    try:
        result: RecoveryResult | None = yield Recover(now)
    except Exception as exc:
        log.warning(loglines.lease_recovery_error(explain(exc, tracker)))
        return None
    if result is None:
        log.debug(loglines.lease_recovery_busy())
        return None
    if result.released > 0:
        log.info(loglines.lease_recovery(result.released))
    return result
