"""Results back to the enqueuer: plans (no I/O) for fetch, get and wait.

A job enqueued with `source_id` belongs to that source; its outcome is delivered to that
source only. The check is in the SQL (`WHERE source_id = ...`), never a comparison in
Python after a row was read, so a bug here cannot leak another source's result.
`source_id` is what the enqueuer says it is, not an authentication: see the README for
row-level security when each source connects as its own role.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from . import loglines
from ._queries import Rendered
from .core import (
    INT_MAX,
    Listen,
    Plan,
    Sleep,
    Stmt,
    WaitNotify,
    check_aware,
    check_int,
    check_job_id,
    check_name,
    check_seconds,
)
from .loglines import logger
from .models import JobOutcome, JobState

DEFAULT_POLL_SECS: Final = 1.0
"""How often `wait_for_result` re-reads the job when no notification arrives."""


def _outcome(row: Mapping[str, Any]) -> JobOutcome:
    return JobOutcome.model_construct(
        job_id=int(row["id"]),
        kind=row["kind"],
        state=JobState(row["state"]),
        result=row["result"],
        last_error=row["last_error"],
        attempts=row["attempts"],
        finished_at=row["finished_at"],
        source_id=row["source_id"],
        delivered_at=row["delivered_at"],
    )


def fetch_results(
    q: Mapping[str, Rendered], source_id: object, limit: object, now: datetime | None
) -> Plan[list[JobOutcome]]:
    params = {
        "source_id": check_name("source_id", source_id),
        "limit": check_int("limit", limit, 1, INT_MAX),
        "now": check_aware("now", now),
    }
    return _fetch(q, params)


def _fetch(q: Mapping[str, Rendered], params: dict[str, Any]) -> Plan[list[JobOutcome]]:
    rows = yield Stmt(q["fetch_results"], params)
    outcomes = [_outcome(row) for row in rows]
    outcomes.sort(key=lambda o: (o.finished_at, o.job_id))
    return outcomes


def _read_result(
    q: Mapping[str, Rendered], params: dict[str, Any]
) -> Plan[tuple[JobOutcome | None, bool]]:
    """One read: the outcome (or None), and whether it is worth waiting for (the job is
    this source's and not finished), both from one snapshot."""
    row = yield Stmt(q["get_result"], params)
    if row["id"] is not None:
        return _outcome(row), False
    if row["foreign_job"]:
        logger.warning(loglines.result_source_mismatch(params["id"], params["source_id"]))
    return None, bool(row["pending"])


def get_result(
    q: Mapping[str, Rendered], job_id: object, source_id: object
) -> Plan[JobOutcome | None]:
    params = {"id": check_job_id("job_id", job_id), "source_id": check_name("source_id", source_id)}
    return _get(q, params)


def _get(q: Mapping[str, Rendered], params: dict[str, Any]) -> Plan[JobOutcome | None]:
    outcome, _ = yield from _read_result(q, params)
    return outcome


def wait_for_result(
    q: Mapping[str, Rendered],
    job_id: object,
    source_id: object,
    timeout: object,
    *,
    channel: str | None,
    poll_secs: float = DEFAULT_POLL_SECS,
) -> Plan[JobOutcome | None]:
    """Wait until the job finishes. With `channel`, LISTEN for finish notifications and
    re-read at least every `poll_secs` (a notification can be missed, never a result);
    without it (PgBouncer in transaction mode), only poll. Returns None at once for a job
    of another source (logged) or one that does not exist; raises TimeoutError when the
    job did not finish within `timeout` seconds."""
    params = {"id": check_job_id("job_id", job_id), "source_id": check_name("source_id", source_id)}
    seconds = check_seconds("timeout", timeout)
    poll = check_seconds("poll_secs", poll_secs, above=True)
    return _wait(q, params, seconds, channel, poll)


def _wait(
    q: Mapping[str, Rendered],
    params: dict[str, Any],
    timeout: float,
    channel: str | None,
    poll_secs: float,
) -> Plan[JobOutcome | None]:
    deadline = time.monotonic() + timeout
    if channel is not None:
        # Listen before the first read, so a finish between the read and the wait still
        # wakes us.
        yield Listen(channel)
    wanted = str(params["id"])
    while True:
        outcome, pending = yield from _read_result(q, params)
        if not pending:  # finished, another source's, or no such job
            return outcome
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"job {params['id']} did not finish within {timeout:g} s")
        if channel is None:
            yield Sleep(min(remaining, poll_secs))
            continue
        # Re-read on our job's notification, or once the poll interval has passed since
        # the last read, however many notifications for other jobs arrive meanwhile.
        next_read = min(deadline, time.monotonic() + poll_secs)
        while (left := next_read - time.monotonic()) > 0:
            payloads = yield WaitNotify(left)
            if wanted in payloads:
                break
