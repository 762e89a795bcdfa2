"""Operator plans: stats, pruning finished jobs, retrying a job.

Like `core` and `schedules`, this module does no I/O: each function validates its
arguments and returns a plan to run with `Substrate.run(plan)`. The SQL is in
`sql/queries/ops.sql`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict

from ._queries import Rendered
from .core import INT_MAX, Plan, Stmt, check_aware, check_int, check_job_id
from .errors import InvalidArgument
from .models import Job, JobState
from .slots import SlotInfo, list_slots

PRUNE_BATCH: Final = 1000
"""Rows deleted per statement: short transactions, short locks, room for autovacuum."""
PRUNABLE_STATES: Final = ("completed", "failed", "cancelled")
"""Only finished jobs can be pruned (the default: all of them)."""


class KindStats(BaseModel):
    """Counts of one kind's jobs by state."""

    model_config = ConfigDict(frozen=True)

    kind: str
    counts: dict[str, int]
    oldest_available_age_secs: float | None
    """Age of the oldest available job that is due (None: none is)."""


class Stats(BaseModel):
    """A snapshot of the jobs table, by Postgres' clock."""

    model_config = ConfigDict(frozen=True)

    now: datetime
    totals: dict[str, int]
    """Jobs per state, every state present (0 when none)."""
    kinds: tuple[KindStats, ...]
    oldest_available_age_secs: float | None
    expired_leases: int
    """Running jobs whose lease has passed: what lease recovery would release now."""
    slots: tuple[SlotInfo, ...] = ()
    """Slots (workers, runtimes) that beat recently, with their liveness."""


def stats(q: Mapping[str, Rendered], now: datetime | None = None) -> Plan[Stats]:
    """Counts by kind and state, the oldest due job's age, expired leases, and slots."""
    params = {"now": check_aware("now", now)}
    health = yield Stmt(q["stats_health"], params)
    rows = yield Stmt(q["stats_by_kind"], params)
    seen = yield from list_slots(q, now)
    at: datetime = health["now"]
    totals = {s.value: 0 for s in JobState}
    per_kind: dict[str, dict[str, int]] = {}
    oldest: dict[str, datetime] = {}
    for row in rows:
        kind, state, count = row["kind"], row["state"], int(row["count"])
        totals[state] = totals.get(state, 0) + count
        per_kind.setdefault(kind, {s.value: 0 for s in JobState})[state] = count
        if row["oldest_due"] is not None:
            oldest[kind] = row["oldest_due"]
    kinds = tuple(
        KindStats(
            kind=kind,
            counts=counts,
            oldest_available_age_secs=(at - oldest[kind]).total_seconds()
            if kind in oldest
            else None,
        )
        for kind, counts in per_kind.items()
    )
    age = health["oldest_available_age_secs"]
    return Stats(
        now=at,
        totals=totals,
        kinds=kinds,
        oldest_available_age_secs=None if age is None else float(age),
        expired_leases=int(health["expired_leases"]),
        slots=tuple(seen),
    )


class PruneResult(BaseModel):
    """What a prune deleted (or, in a dry run, would delete)."""

    model_config = ConfigDict(frozen=True)

    deleted: int
    cutoff: datetime
    states: tuple[str, ...]
    dry_run: bool = False


def check_prune_states(states: object) -> tuple[str, ...]:
    """A non-empty list of finished states."""
    allowed = set(PRUNABLE_STATES)
    if isinstance(states, str) or not isinstance(states, Sequence) or not states:
        raise InvalidArgument("states", states, f"a non-empty list of {', '.join(sorted(allowed))}")
    for state in states:
        if state not in allowed:
            raise InvalidArgument(
                "states", state, f"a finished state ({', '.join(sorted(allowed))})"
            )
    return tuple(dict.fromkeys(str(s) for s in states))


def prune(
    q: Mapping[str, Rendered],
    older_than_secs: object,
    states: object = PRUNABLE_STATES,
    *,
    batch_size: object = PRUNE_BATCH,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    now: datetime | None = None,
) -> Plan[PruneResult]:
    """Delete jobs in `states` that finished more than `older_than_secs` ago, in batches
    of `batch_size` rows, each its own short transaction (the pool runs in autocommit).

    `progress(deleted_so_far, total)` is called after each batch (and once before the
    first, with the count to delete) when given; counting costs one extra scan of the
    finished_at index, so it is only done for progress and dry runs.
    """
    secs = check_int("older_than_secs", older_than_secs, 0, INT_MAX)
    checked = check_prune_states(states)
    batch = check_int("batch_size", batch_size, 1, 100_000)
    row = yield Stmt(q["prune_cutoff"], {"now": check_aware("now", now), "older_than_secs": secs})
    cutoff: datetime = row["cutoff"]
    params: dict[str, Any] = {"cutoff": cutoff, "states": list(checked), "limit": batch}
    total = 0
    if dry_run or progress is not None:
        counted = yield Stmt(q["prune_count"], params)
        total = int(counted["count"])
        if dry_run:
            return PruneResult(deleted=total, cutoff=cutoff, states=checked, dry_run=True)
        assert progress is not None
        progress(0, total)
    deleted = 0
    while True:
        n = yield Stmt(q["prune_batch"], params)
        deleted += int(n)
        if progress is not None:
            progress(deleted, max(total, deleted))
        if n < batch:
            break
    return PruneResult(deleted=deleted, cutoff=cutoff, states=checked)


class RetryResult(BaseModel):
    """`retry_job`'s answer: the job made available, or why not (`job` as found)."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    job: Job | None
    """The job after the retry, or as found when refused; None when it does not exist."""


def retry_job(
    q: Mapping[str, Rendered], job_id: object, now: datetime | None = None
) -> Plan[RetryResult]:
    """Make a failed, cancelled or available job available now (see `retry_job` in
    ops.sql). Running and completed jobs are refused, as a value."""
    params = {"id": check_job_id("job_id", job_id), "now": check_aware("now", now)}
    row = yield Stmt(q["retry_job"], params)
    if row is not None:
        return RetryResult(ok=True, job=_job(row))
    found = yield Stmt(q["get_job"], {"id": params["id"]})
    return RetryResult(ok=False, job=None if found is None else _job(found))


def _job(row: Mapping[str, Any]) -> Job:
    return Job.model_construct(**{**row, "state": JobState(row["state"])})
