"""Recurring schedules: the file format, and plans to upsert, list, delete and tick them.

A schedule enqueues a job of `kind` with `payload` every `interval_secs` seconds. It is a
row of the `schedules` table (migration 0004), written from a JSON file::

    {"name": "heartbeat", "kind": "liveness.ping", "payload": {}, "interval_secs": 3600}

with the optional keys `enabled` (true), `priority` (0) and `max_attempts` (5). Unknown
keys are an error, so a typo cannot silently become a default.

Runs sit on a grid: the next run is the last run plus the interval, or now when the
schedule never ran. `schedule_tick` enqueues each due run exactly once, even with
several tickers at once, and coalesces runs missed while nobody ticked into one. Every
decision is SQL with Postgres' clock (`sql/queries/schedules.sql`), and the jobs go
through `enqueue_jobs`, the one insert every job takes; this module only
validates and shapes, like `core`, and does no I/O: run its plans with
`Substrate.run(plan)` or `await AsyncSubstrate.run(plan)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic import ValidationError as _PydanticValidationError

from ._queries import Rendered
from .core import (
    BEGIN,
    COMMIT,
    SMALLINT_MAX,
    SMALLINT_MIN,
    Plan,
    Stmt,
    check_aware,
    check_int,
    enqueue_rows,
    job_row,
    to_json,
)
from .errors import InvalidArgument, SubstrateError

MAX_SCHEDULE_NAME_LEN: Final = 160
"""Longest schedule name: the run's dedupe key `schedule:<name>:<epoch>` must fit in 200."""
TICK_PAGE: Final = 100
"""A tick locks, enqueues and advances at most this many schedules per transaction."""


class ScheduleFileError(SubstrateError, ValueError):
    """A schedule file could not be read or does not describe a valid schedule."""


_NoNul = Field(pattern=r"^[^\x00]*$")


class ScheduleSpec(BaseModel):
    """A schedule as written in a `*.schedule.json` file (strict: no coercion)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[StrictStr, Field(min_length=1, max_length=MAX_SCHEDULE_NAME_LEN), _NoNul]
    """Unique; upserting a spec with an existing name replaces that schedule in place."""
    kind: Annotated[StrictStr, Field(min_length=1, max_length=200), _NoNul]
    """The kind of the jobs it enqueues."""
    payload: Any = Field(default_factory=dict)
    """The payload of every job it enqueues (any JSON value)."""
    interval_secs: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
    """Seconds between runs."""
    enabled: StrictBool = True
    """A disabled schedule is never due; enabling it again makes it due from its grid."""
    priority: Annotated[StrictInt, Field(ge=SMALLINT_MIN, le=SMALLINT_MAX)] = 0
    max_attempts: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)] = 5

    @classmethod
    def from_mapping(cls, data: object, *, source: str = "schedule") -> ScheduleSpec:
        """Validate a decoded JSON object; errors name the source, the key and the value."""
        if not isinstance(data, Mapping):
            raise ScheduleFileError(
                f"{source}: expected a JSON object with name, kind, payload and interval_secs, "
                f"got: {type(data).__name__}"
            )
        try:
            spec = cls.model_validate(dict(data))
        except _PydanticValidationError as exc:
            raise ScheduleFileError(f"{source}: {_describe(exc)}") from None
        to_json("payload", spec.payload)  # refuses what jsonb would refuse later
        return spec

    @classmethod
    def from_file(cls, path: str | Path) -> ScheduleSpec:
        """Read and validate a `*.schedule.json` file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ScheduleFileError(f"cannot read schedule file {str(path)!r}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScheduleFileError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_mapping(data, source=str(path))


def _describe(exc: _PydanticValidationError) -> str:
    """Pydantic's errors in one line: `key: what was wrong (got: value)`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        elif err["type"] == "missing":
            parts.append(f"missing key {where!r}")
        else:
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            parts.append(f"{where}: {err['msg'].lower()} (got: {shown})")
    return "; ".join(parts)


class Schedule(BaseModel):
    """A stored schedule: the spec's fields, plus its place on the grid."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    payload: Any
    interval_secs: int
    enabled: bool
    priority: int
    max_attempts: int
    next_run_at: datetime
    last_run_at: datetime | None
    last_job_id: int | None


class UpsertResult(BaseModel):
    """What `upsert` did: the schedule as stored, and whether it was new."""

    model_config = ConfigDict(frozen=True)

    schedule: Schedule
    created: bool


class TickRun(BaseModel):
    """One due run that a tick handled."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    due_at: datetime
    """The grid point this run is for (the job's run_at)."""
    dedupe_key: str
    job_id: int | None
    """The job enqueued; None when an unfinished job already held the run's dedupe key."""
    next_run_at: datetime


class TickResult(BaseModel):
    """What one tick did, and every schedule's next run afterwards."""

    model_config = ConfigDict(frozen=True)

    runs: tuple[TickRun, ...]
    schedules: tuple[Schedule, ...]

    @property
    def enqueued(self) -> int:
        """How many jobs the tick inserted."""
        return sum(1 for r in self.runs if r.job_id is not None)


_SCHEDULE_FIELDS: Final = tuple(Schedule.model_fields)


def _schedule(row: Mapping[str, Any]) -> Schedule:
    return Schedule.model_construct(**{k: row[k] for k in _SCHEDULE_FIELDS})


# -- plans ------------------------------------------------------------------------------


def upsert(
    q: Mapping[str, Rendered], spec: ScheduleSpec, now: datetime | None
) -> Plan[UpsertResult]:
    """Create the schedule, or replace the one with its name in place."""
    if not isinstance(spec, ScheduleSpec):
        raise InvalidArgument("spec", spec, "a ScheduleSpec")
    params = {
        "name": spec.name,
        "kind": spec.kind,
        "payload": to_json("payload", spec.payload),
        "interval_secs": spec.interval_secs,
        "enabled": spec.enabled,
        "priority": spec.priority,
        "max_attempts": spec.max_attempts,
        "now": check_aware("now", now),
    }
    row = yield Stmt(q["schedule_upsert"], params)
    return UpsertResult(schedule=_schedule(row), created=bool(row["created"]))


def list_schedules(q: Mapping[str, Rendered]) -> Plan[list[Schedule]]:
    """Every schedule, by name."""
    rows = yield Stmt(q["schedule_list"])
    return [_schedule(r) for r in rows]


def delete(q: Mapping[str, Rendered], name: object) -> Plan[bool]:
    """Delete a schedule by name; False when there was none. Its enqueued jobs stay."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("name", name, "a schedule name")
    row = yield Stmt(q["schedule_delete"], {"name": name})
    return row is not None


def tick(
    q: Mapping[str, Rendered], now: datetime | None = None, *, page_size: int = TICK_PAGE
) -> Plan[TickResult]:
    """Enqueue every due run, page by page (each page one short transaction: lock the
    due schedules, insert their jobs through `enqueue_jobs`, advance them), then read
    every schedule's next run."""
    check_int("page_size", page_size, 1, 10_000)
    now = check_aware("now", now)
    runs: list[TickRun] = []
    while True:
        yield BEGIN
        due = yield Stmt(q["schedule_due"], {"now": now, "limit": page_size})
        page = yield from _enqueue_due(q, due, now)
        yield COMMIT
        runs.extend(page)
        if len(due) < page_size:
            break
    schedules = yield from list_schedules(q)
    return TickResult(runs=tuple(runs), schedules=tuple(schedules))


def _enqueue_due(
    q: Mapping[str, Rendered], due: list[dict[str, Any]], now: datetime | None
) -> Plan[list[TickRun]]:
    if not due:
        return []
    rows = [
        job_row(
            "",
            d["kind"],
            d["payload"],
            d["priority"],
            d["due_at"],
            d["max_attempts"],
            d["dedupe_key"],
            None,
            None,
        )
        for d in due
    ]
    enqueued = yield from enqueue_rows(q, rows, now)
    job_ids = [job_id if inserted else None for job_id, inserted in enqueued]
    advanced = yield Stmt(
        q["schedule_advance"],
        {
            "names": [d["name"] for d in due],
            "due_ats": [d["due_at"] for d in due],
            "job_ids": job_ids,
            "now": now,
        },
    )
    next_runs = {row["name"]: row["next_run_at"] for row in advanced}
    return [
        TickRun.model_construct(
            name=d["name"],
            kind=d["kind"],
            due_at=d["due_at"],
            dedupe_key=d["dedupe_key"],
            job_id=job_id,
            next_run_at=next_runs[d["name"]],
        )
        for d, job_id in zip(due, job_ids, strict=True)
    ]
