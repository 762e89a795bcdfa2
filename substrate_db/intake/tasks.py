"""Local tasks: what a claimed job becomes in an agent runtime's own queue.

`LocalTask` is the runtime-neutral shape (subject, source, priority, max_attempts,
payload). `LocalTaskQueue` is the one method the intake needs from a runtime's queue,
and `SQLiteTaskQueue` a complete reference implementation on the standard library's
`sqlite3` that a runtime can use as is (and that the tests use).

The payload of a task made from a job carries the job's payload plus three keys the
intake reads back at write-back time (see `PAYLOAD_JOB_ID` and friends).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from ..models import JsonValue

SOURCE_PREFIX: Final = "substrate:"
"""`source` of a task made from a job: `substrate:<job id>`."""
PAYLOAD_JOB_ID: Final = "_substrate_job_id"
PAYLOAD_CLAIM_EPOCH: Final = "_substrate_claim_epoch"
PAYLOAD_IDEMPOTENCY_KEY: Final = "idempotency_key"
RESERVED_PAYLOAD_KEYS: Final = (PAYLOAD_JOB_ID, PAYLOAD_CLAIM_EPOCH, PAYLOAD_IDEMPOTENCY_KEY)


class LocalTask(BaseModel):
    """A task of a runtime's local queue, built from these five fields alone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject: str = Field(min_length=1)
    """What the task is about; for a job, the payload's `subject` or else the job kind."""
    source: str = Field(min_length=1)
    """Where it came from; `substrate:<job id>` for a job."""
    priority: int = 1
    """Lower runs first in `SQLiteTaskQueue`; a job's task gets 1 so it runs on this or
    the next local tick and its lease tracks the real execution time."""
    max_attempts: int = Field(default=1, ge=1)
    """Local attempts; 1 for a job, whose retries the substrate owns."""
    payload: dict[str, JsonValue] = Field(default_factory=dict)
    """A JSON object."""

    def substrate_lease(self) -> tuple[int, int] | None:
        """(job id, claim epoch) when this task was made from a substrate job, so a
        heartbeat can `track()` the task itself."""
        from .logic import write_back_target  # logic builds tasks: import when used

        target = write_back_target(self)
        return None if isinstance(target, str) else (target.job_id, target.epoch)


@runtime_checkable
class LocalTaskQueue(Protocol):
    """A runtime's local queue, as the intake sees it."""

    def enqueue_task(self, task: LocalTask) -> str:
        """Add the task; return its id in this queue."""
        ...


@runtime_checkable
class AsyncLocalTaskQueue(Protocol):
    """A local queue whose `enqueue_task` is a coroutine (for `AsyncSubstrateIntake`)."""

    def enqueue_task(self, task: LocalTask) -> Awaitable[str]:
        """Add the task; return its id in this queue."""
        ...


TaskState = Literal["queued", "running", "done", "failed"]


class TakenTask(NamedTuple):
    """A task handed out by `SQLiteTaskQueue.take_next`."""

    task_id: str
    task: LocalTask
    attempt: int
    """1 on the first run, counting up when a failed task is run again."""


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS local_tasks (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    subject      TEXT    NOT NULL,
    source       TEXT    NOT NULL,
    priority     INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
    payload      TEXT    NOT NULL,
    state        TEXT    NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    result       TEXT,
    error        TEXT,
    created_at   REAL    NOT NULL,
    started_at   REAL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS local_tasks_next ON local_tasks (priority, id) WHERE state = 'queued';
"""

_INSERT: Final = """
INSERT INTO local_tasks (subject, source, priority, max_attempts, payload, created_at)
VALUES (?, ?, ?, ?, ?, ?)
"""
_GET: Final = (
    "SELECT subject, source, priority, max_attempts, payload FROM local_tasks WHERE id = ?"
)
_STATE: Final = "SELECT state FROM local_tasks WHERE id = ?"
_TAKE: Final = """
UPDATE local_tasks
SET state = 'running', attempts = attempts + 1, started_at = ?
WHERE id = (SELECT id FROM local_tasks WHERE state = 'queued' ORDER BY priority, id LIMIT 1)
RETURNING id, subject, source, priority, max_attempts, payload, attempts
"""
_FINISH: Final = """
UPDATE local_tasks
SET state = CASE WHEN ? THEN 'done'
                 WHEN attempts < max_attempts THEN 'queued'
                 ELSE 'failed' END,
    result = ?, error = ?,
    finished_at = CASE WHEN ? OR attempts >= max_attempts THEN ? END
WHERE id = ? AND state = 'running'
RETURNING state
"""


class SQLiteTaskQueue:
    """A local task queue in one SQLite file (or `":memory:"`), safe across threads.

    Tasks run in priority order (lower first), then in insertion order. `take_next`
    marks a task running; `finish` marks it done, or failed, or queued again while it has
    local attempts left. Several processes may share the file: each change runs in its
    own `BEGIN IMMEDIATE` transaction, and the file uses SQLite's WAL journal.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # One connection, shared by threads under a lock: also keeps ":memory:" alive.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)

    def __repr__(self) -> str:
        return f"SQLiteTaskQueue({self.path!r})"

    def enqueue_task(self, task: LocalTask) -> str:
        """Add a task; return its id (a decimal string, never reused)."""
        payload = json.dumps(task.payload, allow_nan=False, separators=(",", ":"))
        row = (task.subject, task.source, task.priority, task.max_attempts, payload, time.time())
        with self._lock:
            cursor = self._db.execute(_INSERT, row)
        return str(cursor.lastrowid)

    def get_task(self, task_id: str) -> LocalTask | None:
        """The task with this id, or None."""
        with self._lock:
            row = self._db.execute(_GET, (_rowid(task_id),)).fetchone()
        return None if row is None else _task(row)

    def state(self, task_id: str) -> TaskState | None:
        """`queued`, `running`, `done` or `failed`; None when there is no such task."""
        with self._lock:
            row = self._db.execute(_STATE, (_rowid(task_id),)).fetchone()
        return None if row is None else row[0]

    def take_next(self) -> TakenTask | None:
        """Mark the next queued task running and return it, or None when none is queued."""
        with self._lock, _immediate(self._db):
            row = self._db.execute(_TAKE, (time.time(),)).fetchone()
        if row is None:
            return None
        return TakenTask(str(row[0]), _task(row[1:6]), int(row[6]))

    def finish(
        self, task_id: str, *, ok: bool, result: JsonValue = None, error: str | None = None
    ) -> TaskState | None:
        """Record the outcome of a running task; return its new state (None when it was
        not running). A failed task with local attempts left is queued again."""
        stored = None if result is None else json.dumps(result, allow_nan=False)
        now = time.time()
        with self._lock, _immediate(self._db):
            row = self._db.execute(
                _FINISH, (ok, stored, error, ok, now, _rowid(task_id))
            ).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        """Close the database file."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SQLiteTaskQueue:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _immediate:
    """`BEGIN IMMEDIATE` ... `COMMIT` (or `ROLLBACK` on error) on an autocommit sqlite3
    connection: the write lock is taken up front, so two processes never both read the
    same next task."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, et: type[BaseException] | None, ev: object, tb: object) -> None:
        self._db.execute("COMMIT" if et is None else "ROLLBACK")


def _rowid(task_id: str) -> int:
    try:
        return int(task_id)
    except (TypeError, ValueError):
        return -1  # no row has this id: "not found", not a crash


def _task(row: Any) -> LocalTask:
    subject, source, priority, max_attempts, payload = row
    return LocalTask(
        subject=subject,
        source=source,
        priority=priority,
        max_attempts=max_attempts,
        payload=json.loads(payload),
    )
