"""Slot liveness without I/O: the slot's reported status, the jobs whose leases it
carries, the failure policy of its heartbeat, and the plans that beat and read slots.

A runtime slot beats every interval. One beat is one round trip (a pipeline of two
statements): it upserts the slot's row and extends the leases of the jobs the slot
holds, so liveness and leases cannot drift apart. The heartbeat loops that send beats
(a thread, an asyncio task) live in `substrate_db.liveness`; every decision they make
is here, so the two flavours cannot disagree.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict

from . import core
from ._queries import Rendered
from .core import Batch, Plan, Stmt
from .errors import InvalidArgument
from .models import ClaimedJob, WriteBackResult

MIN_INTERVAL_SECS: Final = 5.0
MAX_INTERVAL_SECS: Final = 300.0
DEFAULT_INTERVAL_SECS: Final = 30.0
STALE_AFTER_INTERVALS: Final = 3
"""A slot not seen for this many of its own intervals is reported `stale`."""
PRUNE_AFTER_SECS: Final = 24 * 3600
"""Rows of slots not seen for this long are deleted by `prune_slots`."""
LOG_FIRST_FAILURES: Final = 3
"""A failed beat is logged on each of the first failures in a row..."""
LOG_EVERY_NTH_FAILURE: Final = 10
"""...then on every Nth, so a long outage cannot flood the runtime's log."""
RECONNECT_AFTER_FAILURES: Final = 10
"""After this many failures in a row the heartbeat drops and recreates its connection."""
ERROR_WINDOW: Final = 100
"""The error rate is over at most this many outcomes since the last beat."""


class SlotState(StrEnum):
    """A slot's liveness. `stale` is never written: readers derive it from last_seen."""

    HEALTHY = "healthy"
    WEDGED = "wedged"
    DRAINING = "draining"
    GONE = "gone"
    STALE = "stale"


class SlotInfo(BaseModel):
    """One slot as operators see it."""

    model_config = ConfigDict(frozen=True)

    slot_id: str
    kinds: list[str]
    host: str | None
    pid: int | None
    started_at: datetime
    last_seen: datetime
    interval_secs: int
    jobs_in_flight: int
    current_job: int | None
    error_rate: float
    state: SlotState
    reported_state: SlotState
    reason: str | None
    beats: int


def clamp_interval(seconds: float) -> float:
    """Beat intervals are kept within [5, 300] seconds."""
    return min(MAX_INTERVAL_SECS, max(MIN_INTERVAL_SECS, float(seconds)))


def beat_interval(interval: float, lease_secs: int | None) -> float:
    """How often to beat: the slot's interval, but at least three beats per lease when
    the beat carries leases (PgQueuer #430: a heartbeat equal to the lease loses jobs)."""
    every = clamp_interval(interval)
    if lease_secs is not None:
        every = min(every, max(1.0, lease_secs / 3))
    return every


@dataclass(frozen=True, slots=True)
class FailureVerdict:
    """What the heartbeat does after a failed beat."""

    failures: int
    log: bool
    reconnect: bool


def judge_failure(failures_in_a_row: int) -> FailureVerdict:
    """Log the first three failures in a row and every tenth after; reconnect after
    every ten in a row."""
    n = failures_in_a_row
    return FailureVerdict(
        failures=n,
        log=n <= LOG_FIRST_FAILURES or n % LOG_EVERY_NTH_FAILURE == 0,
        reconnect=n % RECONNECT_AFTER_FAILURES == 0,
    )


@dataclass(frozen=True, slots=True)
class Beat:
    """A snapshot of what one beat sends."""

    params: dict[str, Any]
    jobs: list[tuple[int, int]]


class SlotStatus:
    """What a slot reports about itself, and the leases it carries. Thread-safe: the
    runtime updates it from its own threads while the heartbeat reads it."""

    def __init__(
        self,
        slot_id: str,
        kinds: Sequence[str] = (),
        *,
        interval_secs: float = DEFAULT_INTERVAL_SECS,
        lease_secs: int | None = None,
    ) -> None:
        self.slot_id = core.check_name("slot_id", slot_id)
        self.kinds = [] if not kinds else core.check_kinds(kinds)
        self.lease_secs = (
            None
            if lease_secs is None
            else core.check_int("lease_secs", lease_secs, 1, core.MAX_LEASE_SECS)
        )
        self.interval_secs = clamp_interval(interval_secs)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._state = SlotState.HEALTHY
        self._reason: str | None = None
        self._jobs: dict[int, int] = {}
        self._lost: dict[int, WriteBackResult] = {}
        self._current: int | None = None
        self._ok = 0
        self._errors = 0

    # -- what the runtime tells us ----------------------------------------------------

    def track(self, job: ClaimedJob | tuple[int, int]) -> None:
        """Carry this job's lease in every beat until `untrack`."""
        job_id, epoch = (job.id, job.claim_epoch) if isinstance(job, ClaimedJob) else job
        with self._lock:
            self._jobs[job_id] = epoch
            self._lost.pop(job_id, None)
            self._current = job_id

    def untrack(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
            self._lost.pop(job_id, None)
            if self._current == job_id:
                self._current = next(reversed(self._jobs), None)

    def lost(self, job_id: int) -> bool:
        """True once a beat found this job's lease no longer ours."""
        with self._lock:
            return job_id in self._lost

    def record_outcome(self, ok: bool) -> None:
        """Count a finished job toward the error rate reported at the next beat."""
        with self._lock:
            if self._ok + self._errors >= ERROR_WINDOW:
                self._ok, self._errors = self._ok // 2, self._errors // 2
            if ok:
                self._ok += 1
            else:
                self._errors += 1

    def mark_wedged(self, reason: str) -> None:
        """The runtime is stuck (it says why); the next beat carries it."""
        self._set(SlotState.WEDGED, reason)

    def clear_wedged(self) -> None:
        with self._lock:
            if self._state == SlotState.WEDGED:
                self._state, self._reason = SlotState.HEALTHY, None

    def mark_draining(self, reason: str = "shutting down") -> None:
        self._set(SlotState.DRAINING, reason)

    def _set(self, state: SlotState, reason: str) -> None:
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidArgument("reason", reason, "a short non-empty text")
        with self._lock:
            self._state, self._reason = state, reason[:500]

    @property
    def state(self) -> SlotState:
        with self._lock:
            return self._state

    @property
    def tracked(self) -> dict[int, int]:
        """job id -> epoch of the leases carried (a copy)."""
        with self._lock:
            return dict(self._jobs)

    # -- what a beat sends and learns -------------------------------------------------

    def take_beat(self, now: datetime | None = None) -> Beat:
        """Snapshot the status for one beat; resets the error-rate window."""
        with self._lock:
            total = self._ok + self._errors
            rate = self._errors / total if total else 0.0
            self._ok = self._errors = 0
            params = {
                "slot_id": self.slot_id,
                "kinds": self.kinds,
                "host": self.host,
                "pid": self.pid,
                "interval_secs": max(1, round(self.interval_secs)),
                "jobs_in_flight": len(self._jobs),
                "current_job": self._current,
                "error_rate": rate,
                "state": str(self._state),
                "reason": self._reason,
                "now": now,
            }
            jobs = [
                (job_id, epoch) for job_id, epoch in self._jobs.items() if job_id not in self._lost
            ]
        return Beat(params, jobs)

    def apply_results(self, results: Sequence[WriteBackResult]) -> list[WriteBackResult]:
        """Record the leases a beat could not extend; return the newly lost ones. A job
        untracked (or re-tracked under a new epoch) while the beat was in flight is not
        reported."""
        newly: list[WriteBackResult] = []
        with self._lock:
            for result in results:
                if result.ok or self._jobs.get(result.job_id) != result.expected_epoch:
                    continue
                if result.job_id not in self._lost:
                    self._lost[result.job_id] = result
                    newly.append(result)
        return newly


def beat_plan(
    q: Mapping[str, Rendered], status: SlotStatus, *, now: datetime | None = None
) -> Plan[list[WriteBackResult]]:
    """One beat: the slot row and the leases in one round trip. Returns newly lost leases."""
    beat = status.take_beat(now)
    stmts = [Stmt(q["slot_beat"], beat.params)]
    prepared = None
    if beat.jobs and status.lease_secs is not None:
        prepared = core.prepare_extend_leases(q, beat.jobs, status.lease_secs, now)
        assert prepared.stmt is not None
        stmts.append(prepared.stmt)
    return _beat(stmts, prepared, status)


def _beat(
    stmts: list[Stmt], prepared: core.PreparedWriteBack | None, status: SlotStatus
) -> Plan[list[WriteBackResult]]:
    received = yield Batch(tuple(stmts))
    if prepared is None:
        return []
    return status.apply_results(prepared.results(received[1]))


def gone_plan(q: Mapping[str, Rendered], status: SlotStatus, reason: str = "stopped") -> Plan[int]:
    """Say the slot stopped cleanly (only the row this process wrote)."""
    params = {"slot_id": status.slot_id, "pid": status.pid, "reason": reason, "now": None}
    return core.run_one(Stmt(q["slot_gone"], params), int)


def list_slots(q: Mapping[str, Rendered], now: datetime | None = None) -> Plan[list[SlotInfo]]:
    return core.run_one(
        Stmt(q["list_slots"], {"now": core.check_aware("now", now)}),
        lambda rows: [SlotInfo.model_validate(row) for row in rows],
    )


def prune_slots(
    q: Mapping[str, Rendered],
    older_than_secs: object = PRUNE_AFTER_SECS,
    now: datetime | None = None,
) -> Plan[int]:
    params = {
        "older_than_secs": core.check_int("older_than_secs", older_than_secs, 1, core.INT_MAX),
        "now": core.check_aware("now", now),
    }
    return core.run_one(Stmt(q["prune_slots"], params), lambda row: int(row["pruned"]))


OnLost = Callable[[WriteBackResult], None]
"""Called once per lease a beat found lost (from the heartbeat's thread or task)."""


# -- log lines (one place, shared by both heartbeat flavours) ---------------------------

logger = logging.getLogger("substrate_db")


def log_beat_failure(status: SlotStatus, verdict: FailureVerdict, exc: BaseException) -> None:
    if verdict.log:
        logger.warning(
            "[substrate] slot-beat-failed slot=%s failures=%d error=%s",
            status.slot_id,
            verdict.failures,
            one_line(exc),
        )
    if verdict.reconnect:
        logger.warning(
            "[substrate] slot-reconnect slot=%s failures=%d", status.slot_id, verdict.failures
        )


def log_beat_recovered(status: SlotStatus, failures: int) -> None:
    logger.info("[substrate] slot-beat-recovered slot=%s after=%d", status.slot_id, failures)


def log_lease_lost(result: WriteBackResult) -> None:
    logger.warning(
        "[substrate] lease-lost jobs.id=%s epoch=%s reason=%s",
        result.job_id,
        result.expected_epoch,
        result.reason,
    )


def log_loop_restart(status: SlotStatus, exc: BaseException) -> None:
    logger.error(
        "[substrate] slot-heartbeat-restart slot=%s error=%s", status.slot_id, one_line(exc)
    )


def one_line(exc: BaseException) -> str:
    """An exception as one line, for log lines that must stay parseable."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
