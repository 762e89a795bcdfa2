"""The execution-side idempotency store: run a side effect once per key.

The claim fence protects the job's state, not the job's effect: an executor whose lease
expired mid-flight may still be running when the job is claimed again, so a handler can
run twice. A handler that records its effect under a key, in the same transaction as
the effect, makes the second run a no-op that returns the first run's result:

    store = IdempotencyStore()                      # schema "substrate" by default
    with substrate.pool.connection() as conn:
        receipt = store.run_once(conn, job_effect_key(task, "charge"),
                                 lambda: charge_card(conn, order))

`run_once` inserts the key first (`INSERT ... ON CONFLICT DO NOTHING`). A concurrent
run with the same key blocks on that insert until the first transaction ends: after a
commit it finds the key taken and returns the stored result without calling its
effect; after a rollback it takes the key and runs its effect. So the effect runs at
most once per committed key, across processes, as long as the caller runs at READ
COMMITTED (Postgres' default; at REPEATABLE READ or above the waiter gets a
serialization error instead, which is safe but must be retried).

`run_once` opens a transaction on `conn` (a savepoint when one is already open), so an
effect that raises rolls back the key with it, and the effect's own statements on `conn`
commit or roll back together with the key. An effect outside the database (an HTTP
call) is not undone by a rollback, of course: give it the key too, when the remote side
accepts one (`ClaimedJob.idempotency_key` is meant for exactly that).

Which key? `ClaimedJob.idempotency_key` (`substrate-<id>-e<epoch>`, also in a local
task's payload) names one *claim*: it dedupes retries inside one execution and is what
a remote API should get, but a job taken back after its lease expired is claimed again
under a new epoch, hence a new key. To run an effect once per *job*, across claims, key
it with `job_effect_key(job, "charge")` (`substrate-<id>-charge`), one key per effect.

Results are JSON values: the first run's result is returned as it will be read back
(a tuple comes back as a list), so both runs see the same value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection, Connection
from psycopg.rows import dict_row

from .. import core
from .._queries import Rendered, rendered_queries
from ..client import DEFAULT_SCHEMA, translate_errors
from ..errors import DatabaseError, InvalidArgument
from ..models import ClaimedJob, JsonValue
from .logic import write_back_target
from .tasks import LocalTask

PRUNE_PAGE: Final = 1000
_EFFECT_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """A stored key and the result of the effect that ran under it."""

    key: str
    result: JsonValue
    created_at: datetime


@dataclass(frozen=True, slots=True)
class _RunEffect:
    """The flow's request to call the effect now; its return value is sent back."""


RUN_EFFECT: Final = _RunEffect()
Step = core.Stmt | _RunEffect


def run_once_flow(
    q: Mapping[str, Rendered], key: object, now: datetime | None
) -> Generator[Step, Any, JsonValue]:
    """The decisions of `run_once`, without I/O (driven inside a transaction). The
    arguments are checked here, before any statement is sent."""
    checked = core.check_name("key", key)
    return _run_once(q, checked, {"key": checked, "now": core.check_aware("now", now)})


def _run_once(
    q: Mapping[str, Rendered], checked: str, params: dict[str, Any]
) -> Generator[Step, Any, JsonValue]:
    # A key deleted by `prune` between the insert and the read is claimed again; twice
    # in a row would take a pruning loop racing this very key.
    for _ in range(3):
        claimed = yield core.Stmt(q["idempotency_claim"], params)
        if claimed is not None:
            result = yield RUN_EFFECT
            stored = core.to_json("result", result)
            yield core.Stmt(q["idempotency_store"], {"key": checked, "result": stored})
            return json.loads(stored)
        row = yield core.Stmt(q["idempotency_get"], {"key": checked})
        if row is not None:
            return row["result"]
    raise DatabaseError(f"idempotency key {checked!r} kept disappearing while it was read")


def job_effect_key(job: ClaimedJob | LocalTask | int, effect: str = "effect") -> str:
    """`substrate-<job id>-<effect>`: a key for one effect of one job, the same in every
    claim of the job (unlike the per-claim `idempotency_key`)."""
    if isinstance(job, ClaimedJob):
        job_id = job.id
    elif isinstance(job, LocalTask):
        target = write_back_target(job)
        if isinstance(target, str):
            raise InvalidArgument("job", job, f"a LocalTask made from a job ({target})")
        job_id = target.job_id
    else:
        job_id = core.check_job_id("job", job)
    if not isinstance(effect, str) or not _EFFECT_NAME.fullmatch(effect):
        raise InvalidArgument("effect", effect, "a name of letters, digits, '_', '.' or '-'")
    return core.check_name("key", f"substrate-{job_id}-{effect}")


def _record(row: Mapping[str, Any] | None) -> IdempotencyRecord | None:
    return None if row is None else IdempotencyRecord(row["key"], row["result"], row["created_at"])


def _prune_params(before: object, limit: object) -> dict[str, Any]:
    aware = core.check_aware("before", before)
    if aware is None:
        raise InvalidArgument("before", before, "a timezone-aware datetime")
    return {"before": aware, "limit": core.check_int("limit", limit, 1, core.INT_MAX)}


def _execute(conn: Connection[Any], stmt: core.Stmt) -> Any:
    with translate_errors(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(stmt.query.sql, stmt.params)
        if stmt.query.returns == "one":
            return cur.fetchone()
        if stmt.query.returns == "many":
            return cur.fetchall()
        return cur.rowcount


async def _aexecute(conn: AsyncConnection[Any], stmt: core.Stmt) -> Any:
    with translate_errors():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(stmt.query.sql, stmt.params)
            if stmt.query.returns == "one":
                return await cur.fetchone()
            if stmt.query.returns == "many":
                return await cur.fetchall()
            return cur.rowcount


class IdempotencyStore:
    """The idempotency store of one schema, used on the caller's blocking connection."""

    def __init__(self, schema: str = DEFAULT_SCHEMA) -> None:
        self.schema = core.check_schema(schema)
        self._q = rendered_queries(self.schema)

    def run_once(
        self,
        conn: Connection[Any],
        key: str,
        effect: Callable[[], JsonValue],
        *,
        now: datetime | None = None,
    ) -> JsonValue:
        """Call `effect()` unless a committed run with `key` exists; return its result
        (this run's, or the first run's). See the module docstring for the guarantees."""
        flow = run_once_flow(self._q, key, now)
        with conn.transaction():
            try:
                step = next(flow)
                while True:
                    value = effect() if isinstance(step, _RunEffect) else _execute(conn, step)
                    step = flow.send(value)
            except StopIteration as stop:
                return stop.value

    def get(self, conn: Connection[Any], key: str) -> IdempotencyRecord | None:
        """The committed record of `key`, or None."""
        checked = core.check_name("key", key)
        return _record(_execute(conn, core.Stmt(self._q["idempotency_get"], {"key": checked})))

    def prune(self, conn: Connection[Any], before: datetime, *, limit: int = PRUNE_PAGE) -> int:
        """Delete up to `limit` keys created before `before`, oldest first; return how
        many. Keep a key at least as long as a job can be retried."""
        stmt = core.Stmt(self._q["idempotency_prune"], _prune_params(before, limit))
        return int(_execute(conn, stmt))


class AsyncIdempotencyStore:
    """The idempotency store for asyncio connections: `IdempotencyStore`'s methods, awaited;
    the effect is a coroutine function."""

    def __init__(self, schema: str = DEFAULT_SCHEMA) -> None:
        self.schema = core.check_schema(schema)
        self._q = rendered_queries(self.schema)

    async def run_once(
        self,
        conn: AsyncConnection[Any],
        key: str,
        effect: Callable[[], Awaitable[JsonValue]],
        *,
        now: datetime | None = None,
    ) -> JsonValue:
        """See `IdempotencyStore.run_once`."""
        flow = run_once_flow(self._q, key, now)
        async with conn.transaction():
            try:
                step = next(flow)
                while True:
                    if isinstance(step, _RunEffect):
                        value = await effect()
                    else:
                        value = await _aexecute(conn, step)
                    step = flow.send(value)
            except StopIteration as stop:
                return stop.value

    async def get(self, conn: AsyncConnection[Any], key: str) -> IdempotencyRecord | None:
        """See `IdempotencyStore.get`."""
        checked = core.check_name("key", key)
        stmt = core.Stmt(self._q["idempotency_get"], {"key": checked})
        return _record(await _aexecute(conn, stmt))

    async def prune(
        self, conn: AsyncConnection[Any], before: datetime, *, limit: int = PRUNE_PAGE
    ) -> int:
        """See `IdempotencyStore.prune`."""
        stmt = core.Stmt(self._q["idempotency_prune"], _prune_params(before, limit))
        return int(await _aexecute(conn, stmt))
