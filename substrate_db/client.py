"""`Substrate` (blocking) and `AsyncSubstrate` (asyncio): thin shells over `core`.

Each public method validates its arguments by building a plan in `core` and hands the
plan to a driver that runs it on a pooled connection. The two drivers below are the
only code that differs between the flavours; the method pairs are one line each and a
test checks that their signatures match.

Pools we create run in autocommit: a single statement is its own transaction (one round
trip, no BEGIN/COMMIT), and plans that need more open a transaction explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg import AsyncConnection, Connection, sql
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from . import core, results, slots
from ._queries import Rendered, load_migrations, rendered_queries
from .errors import ConnectionFailed, DatabaseError, SchemaNotMigrated
from .migrate import migrate_plan, status_plan
from .models import (
    ClaimedJob,
    Job,
    JobOutcome,
    JsonValue,
    MigrationStatus,
    RecoveryResult,
    WriteBackResult,
)
from .slots import SlotInfo

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_SCHEMA = "substrate"


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver errors into substrate errors, keeping the original as `__cause__`."""
    try:
        yield
    except psycopg.errors.UndefinedTable as exc:
        if "does not exist" not in (exc.diag.message_primary or ""):
            raise DatabaseError(_one_line(exc), sqlstate=exc.sqlstate) from exc
        raise SchemaNotMigrated(
            f"{exc.diag.message_primary or exc}: the substrate schema is missing or not "
            "migrated; run `substrate-db migrate` or `Substrate.migrate()`",
            sqlstate=exc.sqlstate,
        ) from exc
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        sqlstate = getattr(exc, "sqlstate", None)
        if not _is_connection_loss(sqlstate):
            # psycopg files lock and statement timeouts (55P03, 57014) under
            # OperationalError too: those are errors of a live connection.
            raise DatabaseError(_one_line(exc), sqlstate=sqlstate) from exc
        # Not chained: a failed connect's exception carries the libpq connection, whose
        # repr holds the password, and error reporters print causes and their locals.
        raise ConnectionFailed(_one_line(exc), sqlstate=sqlstate) from None
    except psycopg.Error as exc:
        raise DatabaseError(_one_line(exc), sqlstate=exc.sqlstate) from exc


def _is_connection_loss(sqlstate: str | None) -> bool:
    """No server answer at all (None), a connection exception (class 08), or the server
    going away under us (57P01 admin shutdown, 57P02 crash, 57P03 cannot connect now)."""
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def pool_kwargs(
    pgbouncer: bool, kwargs: dict[str, Any] | Callable[[], dict[str, Any]] | None
) -> dict[str, Any] | Callable[[], dict[str, Any]]:
    """Connection settings for pools we build. Behind PgBouncer in transaction mode,
    server-side prepared statements would leak between clients, so none are made.
    `kwargs` may be a callable (psycopg_pool calls it for every new connection, e.g. to
    resolve a rotated password); ours are then merged into what it returns."""
    ours: dict[str, Any] = {"autocommit": True}
    if pgbouncer:
        ours["prepare_threshold"] = None
    if callable(kwargs):
        supplied = kwargs
        return lambda: {**ours, **supplied()}
    return {**ours, **(kwargs or {})}


_JSON = json.JSONDecoder()


def _json_loads(data: str | bytes) -> Any:
    """psycopg hands json and jsonb values over as bytes, and `json.loads(bytes)` first
    sniffs the encoding (UTF-8, -16 or -32) before it decodes. What Postgres sends is
    UTF-8 text: decode it and parse, 0.7 us against 1.3 us for a small payload, once per
    claimed job."""
    return _JSON.decode(data if isinstance(data, str) else data.decode())


def _configure_sync(
    theirs: Callable[[Connection[Any]], None] | None,
) -> Callable[[Connection[Any]], None]:
    """The `configure` of pools we build: our JSON loader, then the caller's hook."""

    def configure(conn: Connection[Any]) -> None:
        set_json_loads(_json_loads, conn)
        if theirs is not None:
            theirs(conn)

    return configure


def _configure_async(
    theirs: Callable[[AsyncConnection[Any]], Any] | None,
) -> Callable[[AsyncConnection[Any]], Any]:
    """`_configure_sync` for asyncio pools (whose hook is a coroutine function)."""

    async def configure(conn: AsyncConnection[Any]) -> None:
        set_json_loads(_json_loads, conn)
        if theirs is not None:
            await theirs(conn)

    return configure


def _pool_sizes(options: dict[str, Any]) -> None:
    """Default to a small pool that grows on demand: one connection kept, up to ten."""
    options.setdefault("min_size", 1)
    options.setdefault("max_size", max(options["min_size"], 10))


def _doc(source: Callable[..., Any]) -> Callable[[F], F]:
    """Give an async method the docstring of its sync twin: written once, read twice."""

    def apply(target: F) -> F:
        target.__doc__ = source.__doc__
        return target

    return apply


def _fetch(cur: psycopg.Cursor[Any], step: core.Stmt) -> Any:
    if step.query.returns == "one":
        return cur.fetchone()
    if step.query.returns == "many":
        return cur.fetchall()
    return cur.rowcount


def _execute(conn: Connection[Any], step: core.Stmt) -> Any:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(step.query.sql, step.params)
        return _fetch(cur, step)


def _execute_batch(conn: Connection[Any], batch: core.Batch) -> list[Any]:
    cursors = [conn.cursor(row_factory=dict_row) for _ in batch.stmts]
    try:
        with conn.pipeline():
            for cur, step in zip(cursors, batch.stmts, strict=True):
                cur.execute(step.query.sql, step.params)
        return [_fetch(cur, step) for cur, step in zip(cursors, batch.stmts, strict=True)]
    finally:
        for cur in cursors:
            cur.close()


def _listen_sql(channel: str) -> sql.Composed:
    return sql.SQL("LISTEN {}").format(sql.Identifier(channel))


def drive(conn: Connection[Any], plan: core.Plan[T]) -> T:
    """Run a plan on a blocking connection."""
    open_txs: list[contextlib.AbstractContextManager[Any]] = []
    listening = False
    try:
        step = next(plan)
        while True:
            value: Any = None
            if isinstance(step, core.Stmt):
                value = _execute(conn, step)
            elif isinstance(step, core.Batch):
                value = _execute_batch(conn, step)
            elif isinstance(step, core.Begin):
                tx = conn.transaction()
                tx.__enter__()
                open_txs.append(tx)
            elif isinstance(step, core.Commit):
                open_txs.pop().__exit__(None, None, None)
            elif isinstance(step, core.Listen):
                listening = True
                conn.execute(_listen_sql(step.channel))
                if not conn.autocommit:
                    conn.commit()  # LISTEN takes effect at commit
            elif isinstance(step, core.WaitNotify):
                value = [n.payload for n in conn.notifies(timeout=step.timeout, stop_after=1)]
            else:
                time.sleep(step.seconds)
            step = plan.send(value)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    except BaseException as exc:
        while open_txs:
            open_txs.pop().__exit__(type(exc), exc, exc.__traceback__)
        raise
    finally:
        plan.close()
        if listening:
            with contextlib.suppress(psycopg.Error):
                conn.execute("UNLISTEN *")
                if not conn.autocommit:
                    conn.commit()


async def _afetch(cur: psycopg.AsyncCursor[Any], step: core.Stmt) -> Any:
    if step.query.returns == "one":
        return await cur.fetchone()
    if step.query.returns == "many":
        return await cur.fetchall()
    return cur.rowcount


async def _aexecute(conn: AsyncConnection[Any], step: core.Stmt) -> Any:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(step.query.sql, step.params)
        return await _afetch(cur, step)


async def _aexecute_batch(conn: AsyncConnection[Any], batch: core.Batch) -> list[Any]:
    cursors = [conn.cursor(row_factory=dict_row) for _ in batch.stmts]
    try:
        async with conn.pipeline():
            for cur, step in zip(cursors, batch.stmts, strict=True):
                await cur.execute(step.query.sql, step.params)
        return [await _afetch(cur, step) for cur, step in zip(cursors, batch.stmts, strict=True)]
    finally:
        for cur in cursors:
            await cur.close()


async def adrive(conn: AsyncConnection[Any], plan: core.Plan[T]) -> T:
    """Run a plan on an asyncio connection."""
    open_txs: list[contextlib.AbstractAsyncContextManager[Any]] = []
    listening = False
    try:
        step = next(plan)
        while True:
            value: Any = None
            if isinstance(step, core.Stmt):
                value = await _aexecute(conn, step)
            elif isinstance(step, core.Batch):
                value = await _aexecute_batch(conn, step)
            elif isinstance(step, core.Begin):
                tx = conn.transaction()
                await tx.__aenter__()
                open_txs.append(tx)
            elif isinstance(step, core.Commit):
                await open_txs.pop().__aexit__(None, None, None)
            elif isinstance(step, core.Listen):
                listening = True
                await conn.execute(_listen_sql(step.channel))
                if not conn.autocommit:
                    await conn.commit()
            elif isinstance(step, core.WaitNotify):
                gen = conn.notifies(timeout=step.timeout, stop_after=1)
                value = [n.payload async for n in gen]
            else:
                await asyncio.sleep(step.seconds)
            step = plan.send(value)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    except BaseException as exc:
        while open_txs:
            await open_txs.pop().__aexit__(type(exc), exc, exc.__traceback__)
        raise
    finally:
        plan.close()
        if listening:
            with contextlib.suppress(psycopg.Error):
                await conn.execute("UNLISTEN *")
                if not conn.autocommit:
                    await conn.commit()


class Substrate:
    """The job substrate on one PostgreSQL database, for threads and plain code.

    Build it from your own `psycopg_pool.ConnectionPool` (you keep ownership), or with
    `Substrate.connect(conninfo)`, which owns its pool and closes it on `close()` or at
    the end of a `with` block. Thread-safe: share one per process.
    """

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool[Any],
        *,
        schema: str = DEFAULT_SCHEMA,
        pgbouncer: bool = False,
        max_result_bytes: int = core.DEFAULT_MAX_RESULT_BYTES,
        lock_timeout: float | None = None,
        statement_timeout: float | None = None,
    ) -> None:
        self._pool = pool
        self._schema = core.check_schema(schema)
        self._q = rendered_queries(self._schema)
        self._owns_pool = False
        self._pgbouncer = pgbouncer
        self._max_result_bytes = core.check_int("max_result_bytes", max_result_bytes, 1, 2**40)
        self._claim_timeouts = core.ClaimTimeouts.from_seconds(lock_timeout, statement_timeout)

    @classmethod
    def connect(
        cls,
        conninfo: str = "",
        *,
        schema: str = DEFAULT_SCHEMA,
        pgbouncer: bool = False,
        max_result_bytes: int = core.DEFAULT_MAX_RESULT_BYTES,
        lock_timeout: float | None = None,
        statement_timeout: float | None = None,
        **pool_options: Any,
    ) -> Substrate:
        """Open a pool to `conninfo` (any libpq conninfo: key=value or URI) and own it.

        `pool_options` go to `psycopg_pool.ConnectionPool` (min_size, max_size, timeout,
        kwargs, ...). With `pgbouncer=True` no server-side prepared statements are used
        and nothing LISTENs, as PgBouncer's transaction mode requires. A job result over
        `max_result_bytes` of JSON is refused and the job failed (`ResultTooLarge`).
        `lock_timeout` and `statement_timeout` (seconds) bound every claim: it runs in a
        transaction that sets them with SET LOCAL (PgBouncer-safe), and a claim that hits
        one raises `DatabaseError` (sqlstate 55P03 or 57014) on a live connection.
        """
        core.check_schema(schema)
        core.ClaimTimeouts.from_seconds(lock_timeout, statement_timeout)  # before any I/O
        kwargs = pool_kwargs(pgbouncer, pool_options.pop("kwargs", None))
        _pool_sizes(pool_options)
        pool_options["configure"] = _configure_sync(pool_options.get("configure"))
        pool = psycopg_pool.ConnectionPool(conninfo, kwargs=kwargs, open=True, **pool_options)
        client = cls(
            pool,
            schema=schema,
            pgbouncer=pgbouncer,
            max_result_bytes=max_result_bytes,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
        )
        client._owns_pool = True
        return client

    @property
    def pool(self) -> psycopg_pool.ConnectionPool[Any]:
        """The connection pool in use."""
        return self._pool

    @property
    def schema(self) -> str:
        """The Postgres schema holding the substrate's tables."""
        return self._schema

    @property
    def queries(self) -> Mapping[str, Rendered]:
        """The named queries rendered for this schema, for plans run with `run`."""
        return self._q

    def close(self) -> None:
        """Close the pool if this client opened it."""
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> Substrate:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def run(self, plan: core.Plan[T], conn: Connection[Any] | None = None) -> T:
        """Run a plan built by `substrate_db.core` (or a feature module) on a pooled
        connection, or on `conn` inside the caller's transaction. Database errors are
        raised as `DatabaseError` subclasses. The extension point for feature modules."""
        with translate_errors():
            if conn is not None:
                return drive(conn, plan)
            with self._pool.connection() as pooled:
                return drive(pooled, plan)

    # -- schema ---------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply pending migrations in order; return the versions applied (empty when
        up to date). Safe to run from several processes at once."""
        return self.run(migrate_plan(self._q, self._schema, load_migrations()))

    def migration_status(self) -> list[MigrationStatus]:
        """Every migration this version knows, with when it was applied (None: pending)."""
        return self.run(status_plan(self._q, self._schema, load_migrations()))

    # -- enqueue ----------------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        payload: JsonValue = None,
        *,
        priority: int = 0,
        run_at: datetime | None = None,
        max_attempts: int = core.DEFAULT_MAX_ATTEMPTS,
        dedupe_key: str | None = None,
        source_id: str | None = None,
        serial_key: str | None = None,
        conn: Any = None,
        now: datetime | None = None,
    ) -> int:
        """Add a job; return its id.

        `payload` is any JSON value (None stores `{}`). A lower `priority` (a smallint)
        is claimed first. `run_at` (timezone-aware) delays the job; by default it is
        claimable at once. With `dedupe_key`, while a job holding that key is available
        or running, that job's id is returned and nothing is inserted. `source_id` names
        who enqueued it (its outcome is delivered to that source: `fetch_results`).
        Jobs sharing a `serial_key` run one at a time, in claim order. With `conn`, the
        insert runs on your connection, inside your transaction: it commits or rolls
        back with it. `now` overrides Postgres' clock (for tests).
        """
        plan = core.enqueue(
            self._q,
            kind,
            payload,
            priority=priority,
            run_at=run_at,
            max_attempts=max_attempts,
            dedupe_key=dedupe_key,
            source_id=source_id,
            serial_key=serial_key,
            now=now,
        )
        return self.run(plan, conn)

    def enqueue_many(
        self, jobs: Iterable[Any], *, conn: Any = None, now: datetime | None = None
    ) -> list[int]:
        """Add many jobs in one round trip; return their ids in input order.

        Each item is a mapping (or a model with `model_dump()`) with `kind` and the
        optional keys `payload`, `priority`, `run_at`, `max_attempts`, `dedupe_key`,
        `source_id`, `serial_key`.
        The batch is one statement: all of it is inserted or none.
        """
        return self.run(core.enqueue_many(self._q, jobs, now), conn)

    # -- claim ------------------------------------------------------------------------

    def claim_next_job(
        self,
        slot_id: str,
        kinds: Sequence[str],
        lease_secs: int = core.DEFAULT_LEASE_SECS,
        *,
        now: datetime | None = None,
    ) -> ClaimedJob | None:
        """Claim the next available job of `kinds` for `slot_id`, or None.

        The job becomes `running` with a new `claim_epoch`, one more attempt, and a lease
        of `lease_secs` measured by Postgres' clock. Present the epoch on every write-back.
        """
        return self.run(
            core.claim_next_job(self._q, slot_id, kinds, lease_secs, now, self._claim_timeouts)
        )

    def claim_jobs(
        self,
        slot_id: str,
        kinds: Sequence[str],
        limit: int,
        lease_secs: int = core.DEFAULT_LEASE_SECS,
        *,
        now: datetime | None = None,
    ) -> list[ClaimedJob]:
        """Claim up to `limit` jobs in one statement, in claim order (priority, run_at, id)."""
        return self.run(
            core.claim_jobs(self._q, slot_id, kinds, limit, lease_secs, now, self._claim_timeouts)
        )

    # -- write-back -------------------------------------------------------------------

    def complete_job(
        self,
        job_id: int,
        claim_epoch: int,
        result: JsonValue = None,
        *,
        now: datetime | None = None,
    ) -> WriteBackResult:
        """Mark a job completed, storing `result`, if it is still running under
        `claim_epoch`. A refused write is a result with `ok=False` and a reason."""
        return self.run(
            core.complete_job(self._q, job_id, claim_epoch, result, now, self._max_result_bytes)
        )

    def complete_jobs(
        self, jobs: Iterable[tuple[int, int, JsonValue]], *, now: datetime | None = None
    ) -> list[WriteBackResult]:
        """Complete many `(job_id, claim_epoch, result)` in one statement, fenced per job;
        one result per item, in input order."""
        return self.run(core.complete_jobs(self._q, jobs, now, self._max_result_bytes))

    def fail_job(
        self,
        job_id: int,
        claim_epoch: int,
        error: str | BaseException,
        *,
        retryable: bool = True,
        retry_in: float | None = None,
        now: datetime | None = None,
    ) -> WriteBackResult:
        """Record a failed attempt, fenced like `complete_job`.

        Retryable with attempts left: back to `available`, run_at moved by `retry_in`
        seconds or by exponential backoff with jitter. Otherwise the job ends `failed`.
        The error text is kept in `last_error`.
        """
        return self.run(
            core.fail_job(self._q, job_id, claim_epoch, error, retryable, retry_in, now)
        )

    def fail_jobs(
        self, jobs: Iterable[Sequence[Any]], *, now: datetime | None = None
    ) -> list[WriteBackResult]:
        """Fail many `(job_id, claim_epoch, error[, retryable[, retry_in]])` in one
        statement, fenced per job; one result per item, in input order."""
        return self.run(core.fail_jobs(self._q, jobs, now))

    def extend_lease(
        self, job_id: int, claim_epoch: int, lease_secs: int, *, now: datetime | None = None
    ) -> WriteBackResult:
        """The heartbeat: move the lease to now + `lease_secs`, fenced on the epoch.
        `ok=False` tells the executor it lost the job and should stop."""
        return self.run(core.extend_lease(self._q, job_id, claim_epoch, lease_secs, now))

    def extend_leases(
        self, jobs: Iterable[tuple[int, int]], lease_secs: int, *, now: datetime | None = None
    ) -> list[WriteBackResult]:
        """Extend many `(job_id, claim_epoch)` leases in one statement."""
        return self.run(core.extend_leases(self._q, jobs, lease_secs, now))

    # -- recovery ---------------------------------------------------------------------

    def release_expired_leases(
        self, limit: int | None = None, *, now: datetime | None = None
    ) -> RecoveryResult:
        """Return running jobs whose lease expired to `available` (run_at unchanged), or
        to `failed` when their attempts are spent; at most `limit` (None: all), in pages
        of short transactions. Fenced: a job finished meanwhile is never touched."""
        result = self.run(core.release_expired_leases(self._q, limit, now))
        assert result is not None
        return result

    def release_expired_leases_exclusive(
        self, limit: int | None = None, *, now: datetime | None = None
    ) -> RecoveryResult | None:
        """Like `release_expired_leases`, but only one caller per schema works at a time
        (a transaction-scoped advisory lock, safe behind PgBouncer). Returns None when
        another owner holds the lock."""
        plan = core.release_expired_leases(self._q, limit, now, exclusive_schema=self._schema)
        return self.run(plan)

    # -- reads and cancel -------------------------------------------------------------

    def db_now(self) -> datetime:
        """Postgres' `now()`: the clock leases, run_at and backoff are measured by (pass
        it, moved, as `now=` to move time in tests)."""
        return self.run(core.db_now(self._q))

    def get_job(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        return self.run(core.get_job(self._q, job_id))

    def list_jobs(
        self, *, kind: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[Job]:
        """Jobs, newest first, optionally of one kind and one state."""
        return self.run(core.list_jobs(self._q, kind, state, limit))

    def cancel_job(self, job_id: int, *, now: datetime | None = None) -> bool:
        """Cancel a job that has not finished; False when it had already finished or does
        not exist. A running job's executor learns it at its next write-back."""
        return self.run(core.cancel_job(self._q, job_id, now))

    # -- results back to the enqueuer ---------------------------------------------------

    def fetch_results(
        self, source_id: str, *, limit: int = 100, now: datetime | None = None
    ) -> list[JobOutcome]:
        """Deliver up to `limit` outcomes of finished jobs enqueued by `source_id` that
        were not delivered yet, oldest first. Each outcome is delivered once, even with
        several consumers at once."""
        return self.run(results.fetch_results(self._q, source_id, limit, now))

    def get_result(self, job_id: int, *, source_id: str) -> JobOutcome | None:
        """The outcome of a finished job of `source_id`, without delivering it. None when
        the job is not finished, does not exist, or belongs to another source (the last
        case is logged as `[substrate] result-source-mismatch`)."""
        return self.run(results.get_result(self._q, job_id, source_id))

    def wait_for_result(
        self, job_id: int, *, source_id: str, timeout: float, poll_secs: float = 1.0
    ) -> JobOutcome | None:
        """Wait until a job of `source_id` finishes and return its outcome: woken by
        LISTEN/NOTIFY, re-reading at least every `poll_secs` (only polling with
        `pgbouncer=True`). None at once for a job that does not exist or is another
        source's; `TimeoutError` when it did not finish within `timeout` seconds."""
        channel = None if self._pgbouncer else f"{self._schema}_results"
        plan = results.wait_for_result(
            self._q, job_id, source_id, timeout, channel=channel, poll_secs=poll_secs
        )
        return self.run(plan)

    # -- slots --------------------------------------------------------------------------

    def list_slots(self, *, now: datetime | None = None) -> list[SlotInfo]:
        """Every slot with its liveness; a slot not seen for 3 of its intervals is `stale`."""
        return self.run(slots.list_slots(self._q, now))

    def prune_slots(
        self, older_than_secs: int = slots.PRUNE_AFTER_SECS, *, now: datetime | None = None
    ) -> int:
        """Delete slots not seen for `older_than_secs` (a day by default); return how many."""
        return self.run(slots.prune_slots(self._q, older_than_secs, now))


class AsyncSubstrate:
    """The job substrate for asyncio: the same methods as `Substrate`, awaited."""

    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        *,
        schema: str = DEFAULT_SCHEMA,
        pgbouncer: bool = False,
        max_result_bytes: int = core.DEFAULT_MAX_RESULT_BYTES,
        lock_timeout: float | None = None,
        statement_timeout: float | None = None,
    ) -> None:
        self._pool = pool
        self._schema = core.check_schema(schema)
        self._q = rendered_queries(self._schema)
        self._owns_pool = False
        self._pgbouncer = pgbouncer
        self._max_result_bytes = core.check_int("max_result_bytes", max_result_bytes, 1, 2**40)
        self._claim_timeouts = core.ClaimTimeouts.from_seconds(lock_timeout, statement_timeout)

    @classmethod
    async def connect(
        cls,
        conninfo: str = "",
        *,
        schema: str = DEFAULT_SCHEMA,
        pgbouncer: bool = False,
        max_result_bytes: int = core.DEFAULT_MAX_RESULT_BYTES,
        lock_timeout: float | None = None,
        statement_timeout: float | None = None,
        **pool_options: Any,
    ) -> AsyncSubstrate:
        """Open an asyncio pool to `conninfo` and own it; see `Substrate.connect`."""
        core.check_schema(schema)
        core.ClaimTimeouts.from_seconds(lock_timeout, statement_timeout)  # before any I/O
        kwargs = pool_kwargs(pgbouncer, pool_options.pop("kwargs", None))
        _pool_sizes(pool_options)
        pool_options["configure"] = _configure_async(pool_options.get("configure"))
        pool = psycopg_pool.AsyncConnectionPool(conninfo, kwargs=kwargs, open=False, **pool_options)
        await pool.open()
        client = cls(
            pool,
            schema=schema,
            pgbouncer=pgbouncer,
            max_result_bytes=max_result_bytes,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
        )
        client._owns_pool = True
        return client

    @property
    def pool(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        """The connection pool in use."""
        return self._pool

    @property
    def schema(self) -> str:
        """The Postgres schema holding the substrate's tables."""
        return self._schema

    @property
    def queries(self) -> Mapping[str, Rendered]:
        """The named queries rendered for this schema, for plans run with `run`."""
        return self._q

    async def close(self) -> None:
        """Close the pool if this client opened it."""
        if self._owns_pool:
            await self._pool.close()

    async def __aenter__(self) -> AsyncSubstrate:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @_doc(Substrate.run)
    async def run(self, plan: core.Plan[T], conn: AsyncConnection[Any] | None = None) -> T:
        with translate_errors():
            if conn is not None:
                return await adrive(conn, plan)
            async with self._pool.connection() as pooled:
                return await adrive(pooled, plan)

    @_doc(Substrate.migrate)
    async def migrate(self) -> list[int]:
        return await self.run(migrate_plan(self._q, self._schema, load_migrations()))

    @_doc(Substrate.migration_status)
    async def migration_status(self) -> list[MigrationStatus]:
        return await self.run(status_plan(self._q, self._schema, load_migrations()))

    @_doc(Substrate.enqueue)
    async def enqueue(
        self,
        kind: str,
        payload: JsonValue = None,
        *,
        priority: int = 0,
        run_at: datetime | None = None,
        max_attempts: int = core.DEFAULT_MAX_ATTEMPTS,
        dedupe_key: str | None = None,
        source_id: str | None = None,
        serial_key: str | None = None,
        conn: Any = None,
        now: datetime | None = None,
    ) -> int:
        plan = core.enqueue(
            self._q,
            kind,
            payload,
            priority=priority,
            run_at=run_at,
            max_attempts=max_attempts,
            dedupe_key=dedupe_key,
            source_id=source_id,
            serial_key=serial_key,
            now=now,
        )
        return await self.run(plan, conn)

    @_doc(Substrate.enqueue_many)
    async def enqueue_many(
        self, jobs: Iterable[Any], *, conn: Any = None, now: datetime | None = None
    ) -> list[int]:
        return await self.run(core.enqueue_many(self._q, jobs, now), conn)

    @_doc(Substrate.claim_next_job)
    async def claim_next_job(
        self,
        slot_id: str,
        kinds: Sequence[str],
        lease_secs: int = core.DEFAULT_LEASE_SECS,
        *,
        now: datetime | None = None,
    ) -> ClaimedJob | None:
        return await self.run(
            core.claim_next_job(self._q, slot_id, kinds, lease_secs, now, self._claim_timeouts)
        )

    @_doc(Substrate.claim_jobs)
    async def claim_jobs(
        self,
        slot_id: str,
        kinds: Sequence[str],
        limit: int,
        lease_secs: int = core.DEFAULT_LEASE_SECS,
        *,
        now: datetime | None = None,
    ) -> list[ClaimedJob]:
        return await self.run(
            core.claim_jobs(self._q, slot_id, kinds, limit, lease_secs, now, self._claim_timeouts)
        )

    @_doc(Substrate.complete_job)
    async def complete_job(
        self,
        job_id: int,
        claim_epoch: int,
        result: JsonValue = None,
        *,
        now: datetime | None = None,
    ) -> WriteBackResult:
        return await self.run(
            core.complete_job(self._q, job_id, claim_epoch, result, now, self._max_result_bytes)
        )

    @_doc(Substrate.complete_jobs)
    async def complete_jobs(
        self, jobs: Iterable[tuple[int, int, JsonValue]], *, now: datetime | None = None
    ) -> list[WriteBackResult]:
        return await self.run(core.complete_jobs(self._q, jobs, now, self._max_result_bytes))

    @_doc(Substrate.fail_job)
    async def fail_job(
        self,
        job_id: int,
        claim_epoch: int,
        error: str | BaseException,
        *,
        retryable: bool = True,
        retry_in: float | None = None,
        now: datetime | None = None,
    ) -> WriteBackResult:
        return await self.run(
            core.fail_job(self._q, job_id, claim_epoch, error, retryable, retry_in, now)
        )

    @_doc(Substrate.fail_jobs)
    async def fail_jobs(
        self, jobs: Iterable[Sequence[Any]], *, now: datetime | None = None
    ) -> list[WriteBackResult]:
        return await self.run(core.fail_jobs(self._q, jobs, now))

    @_doc(Substrate.extend_lease)
    async def extend_lease(
        self, job_id: int, claim_epoch: int, lease_secs: int, *, now: datetime | None = None
    ) -> WriteBackResult:
        return await self.run(core.extend_lease(self._q, job_id, claim_epoch, lease_secs, now))

    @_doc(Substrate.extend_leases)
    async def extend_leases(
        self, jobs: Iterable[tuple[int, int]], lease_secs: int, *, now: datetime | None = None
    ) -> list[WriteBackResult]:
        return await self.run(core.extend_leases(self._q, jobs, lease_secs, now))

    @_doc(Substrate.release_expired_leases)
    async def release_expired_leases(
        self, limit: int | None = None, *, now: datetime | None = None
    ) -> RecoveryResult:
        result = await self.run(core.release_expired_leases(self._q, limit, now))
        assert result is not None
        return result

    @_doc(Substrate.release_expired_leases_exclusive)
    async def release_expired_leases_exclusive(
        self, limit: int | None = None, *, now: datetime | None = None
    ) -> RecoveryResult | None:
        plan = core.release_expired_leases(self._q, limit, now, exclusive_schema=self._schema)
        return await self.run(plan)

    @_doc(Substrate.db_now)
    async def db_now(self) -> datetime:
        return await self.run(core.db_now(self._q))

    @_doc(Substrate.get_job)
    async def get_job(self, job_id: int) -> Job | None:
        return await self.run(core.get_job(self._q, job_id))

    @_doc(Substrate.list_jobs)
    async def list_jobs(
        self, *, kind: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[Job]:
        return await self.run(core.list_jobs(self._q, kind, state, limit))

    @_doc(Substrate.cancel_job)
    async def cancel_job(self, job_id: int, *, now: datetime | None = None) -> bool:
        return await self.run(core.cancel_job(self._q, job_id, now))

    @_doc(Substrate.fetch_results)
    async def fetch_results(
        self, source_id: str, *, limit: int = 100, now: datetime | None = None
    ) -> list[JobOutcome]:
        return await self.run(results.fetch_results(self._q, source_id, limit, now))

    @_doc(Substrate.get_result)
    async def get_result(self, job_id: int, *, source_id: str) -> JobOutcome | None:
        return await self.run(results.get_result(self._q, job_id, source_id))

    @_doc(Substrate.wait_for_result)
    async def wait_for_result(
        self,
        job_id: int,
        *,
        source_id: str,
        timeout: float,  # noqa: ASYNC109 - the sync twin's signature; the wait is in the plan
        poll_secs: float = 1.0,
    ) -> JobOutcome | None:
        channel = None if self._pgbouncer else f"{self._schema}_results"
        plan = results.wait_for_result(
            self._q, job_id, source_id, timeout, channel=channel, poll_secs=poll_secs
        )
        return await self.run(plan)

    @_doc(Substrate.list_slots)
    async def list_slots(self, *, now: datetime | None = None) -> list[SlotInfo]:
        return await self.run(slots.list_slots(self._q, now))

    @_doc(Substrate.prune_slots)
    async def prune_slots(
        self, older_than_secs: int = slots.PRUNE_AFTER_SECS, *, now: datetime | None = None
    ) -> int:
        return await self.run(slots.prune_slots(self._q, older_than_secs, now))
