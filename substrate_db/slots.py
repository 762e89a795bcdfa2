"""Slot liveness without I/O: the slot's reported status, the jobs whose leases it
carries, the failure policy of its heartbeat, and the plans that beat and read slots.

A runtime slot beats every interval. One beat is one round trip (a pipeline of two
statements): it upserts the slot's row and extends the leases of the jobs the slot
holds, so liveness and leases cannot drift apart. The heartbeat loops that send beats
(a thread, an asyncio task) live in `substrate_db.liveness`; every decision they make
is here, so the two flavours cannot disagree.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict

from . import core, loglines
from ._queries import Rendered
from .core import Batch, Plan, Stmt
from .errors import InvalidArgument
from .leases import LeaseBook
from .loglines import logger
from .models import WriteBackResult

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


class SlotStatus:
    """What a slot reports about itself. Thread-safe: the runtime updates it from its own
    threads while the heartbeat reads it. The leases a slot carries are tracked by its
    heartbeat (`SlotHeartbeat.track`), which also fills in jobs in flight."""

    def __init__(
        self,
        slot_id: str,
        kinds: Sequence[str] = (),
        *,
        interval_secs: float = DEFAULT_INTERVAL_SECS,
    ) -> None:
        self.slot_id = core.check_name("slot_id", slot_id)
        self.kinds = [] if not kinds else core.check_kinds(kinds)
        self.interval_secs = clamp_interval(interval_secs)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._state = SlotState.HEALTHY
        self._reason: str | None = None
        self._ok = 0
        self._errors = 0

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

    def take_beat(
        self, in_flight: Sequence[tuple[int, int]], now: datetime | None = None
    ) -> dict[str, Any]:
        """The slot row's parameters for one beat (resetting the error-rate window). The most
        recently tracked job is reported as the current one."""
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
                "jobs_in_flight": len(in_flight),
                "current_job": in_flight[-1][0] if in_flight else None,
                "error_rate": rate,
                "state": str(self._state),
                "reason": self._reason,
                "now": now,
            }
        return params


def beat_plan(
    q: Mapping[str, Rendered],
    status: SlotStatus | None,
    book: LeaseBook[Any],
    lease_secs: int | None,
    *,
    now: datetime | None = None,
) -> Plan[list[WriteBackResult]]:
    """One beat: the slot row (when there is a slot) and the due leases (when there is
    a lease to renew) in one round trip. Returns the leases newly found lost."""
    stmts: list[Stmt] = []
    if status is not None:
        stmts.append(Stmt(q["slot_beat"], status.take_beat(book.tracked(), now)))
    prepared = None
    due = book.due() if lease_secs is not None else []
    if due:
        prepared = core.prepare_extend_leases(q, due, lease_secs, now)
        assert prepared.stmt is not None
        stmts.append(prepared.stmt)
    return _beat(stmts, prepared, book)


def _beat(
    stmts: list[Stmt], prepared: core.PreparedWriteBack | None, book: LeaseBook[Any]
) -> Plan[list[WriteBackResult]]:
    if not stmts:
        return []
    received = yield Batch(tuple(stmts))
    if prepared is None:
        return []
    results = yield from prepared.finish(received[-1])
    return book.settle(results)


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


OnLost = Callable[[int, WriteBackResult], Any]
"""`on_lost(job_id, result)`: called once per lease a beat found lost, from the
heartbeat's thread or task (for the async heartbeat it may be a coroutine function)."""


# -- log lines (formatted in `loglines`; shared by both heartbeat flavours) -------------


def log_beat_failure(status: SlotStatus, verdict: FailureVerdict, exc: BaseException) -> None:
    if verdict.log:
        logger.warning(loglines.slot_beat_failed(status.slot_id, verdict.failures, one_line(exc)))
    if verdict.reconnect:
        logger.warning(loglines.slot_reconnect(status.slot_id, verdict.failures))


def log_beat_recovered(status: SlotStatus, failures: int) -> None:
    logger.info(loglines.slot_beat_recovered(status.slot_id, failures))


def log_lease_lost(result: WriteBackResult) -> None:
    logger.warning(loglines.lease_lost(result.job_id, result.expected_epoch, str(result.reason)))


def log_callback_error(exc: BaseException) -> None:
    logger.error(loglines.callback_error("on_lost", one_line(exc)))


def log_loop_restart(status: SlotStatus, exc: BaseException) -> None:
    logger.error(loglines.slot_heartbeat_restart(status.slot_id, one_line(exc)))


def one_line(exc: BaseException) -> str:
    """An exception as one line, with its type."""
    return f"{type(exc).__name__}: {loglines.text(exc)}"
