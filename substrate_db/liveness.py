"""The slot heartbeat: a loop that beats a slot's row and carries its leases, and never dies.

`SlotHeartbeat` runs in a daemon thread for blocking runtimes; `AsyncSlotHeartbeat` is an
asyncio task. Both only send beats and sleep: what a beat contains, what a failure means
(log it? reconnect?) and which leases were lost is decided in `substrate_db.slots`.

The heartbeat has its own connection, not one from the pool, so a pool saturated by
busy workers can never starve it, and so it can drop and recreate that connection after
repeated failures. A failed beat never stops the loop; a crash of the loop itself (a bug)
is logged and the loop starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any

import psycopg

from . import slots
from .client import AsyncSubstrate, Substrate, _doc, adrive, drive, translate_errors
from .core import MAX_LEASE_SECS, check_int
from .leases import LeaseBook, LeaseTracking
from .models import WriteBackResult
from .slots import OnLost, SlotStatus

RESTART_DELAY_SECS = 1.0
"""Pause before a crashed loop starts again, so a persistent bug cannot spin."""


def _check_lease(lease_secs: int | None) -> int | None:
    if lease_secs is None:
        return None
    return check_int("lease_secs", lease_secs, 1, MAX_LEASE_SECS)


def _connect_args(pool: Any) -> tuple[str, dict[str, Any]]:
    """The pool's conninfo and connection kwargs (psycopg_pool accepts callables for
    both, e.g. to resolve a rotated password per connection: call them each time)."""
    conninfo = pool.conninfo() if callable(pool.conninfo) else pool.conninfo
    kwargs = pool.kwargs() if callable(pool.kwargs) else dict(pool.kwargs or {})
    kwargs["autocommit"] = True
    return conninfo, kwargs


class SlotHeartbeat(LeaseTracking[threading.Event]):
    """Beats `status` every interval from a daemon thread, carrying the leases of the
    jobs it tracks (`track(job)` returns an event set when that lease is lost).

    Use as a context manager or `start()`/`stop()`. With `lease_secs`, each beat extends
    every tracked lease to now + lease_secs, and the slot beats at least every
    lease_secs / 3. `on_lost(job_id, result)` is called once for each job whose lease a
    beat could not extend (it was reclaimed, finished or cancelled): stop working on it.
    `stop()` marks the slot `gone`.
    """

    def __init__(
        self,
        substrate: Substrate,
        status: SlotStatus,
        *,
        lease_secs: int | None = None,
        on_lost: OnLost | None = None,
        connect: Callable[[], psycopg.Connection[Any]] | None = None,
    ) -> None:
        self.status = status
        self.lease_secs = _check_lease(lease_secs)
        self._book = LeaseBook(threading.Event)
        self._conn_lock = threading.Lock()
        self._substrate = substrate
        self._on_lost = on_lost
        self._connect = connect or self._connect_like_pool
        self._conn: psycopg.Connection[Any] | None = None
        self._failures = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._every = slots.beat_interval(status.interval_secs, self.lease_secs)

    def _connect_like_pool(self) -> psycopg.Connection[Any]:
        pool = self._substrate.pool
        conninfo, kwargs = _connect_args(pool)
        # The pool's connection class, so whatever it does on connect (the intake's
        # re-resolves a rotated password) applies to the heartbeat's connection too.
        conn: psycopg.Connection[Any] = pool.connection_class.connect(conninfo, **kwargs)
        return conn

    def start(self) -> SlotHeartbeat:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._main, name=f"substrate-heartbeat-{self.status.slot_id}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, reason: str = "stopped", timeout: float = 10.0) -> None:
        """End the loop, then mark the slot gone (best effort: a dead database is fine)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(Exception):
            self._run(slots.gone_plan(self._substrate.queries, self.status, reason))
        self._drop()

    def __enter__(self) -> SlotHeartbeat:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def beat(self, *, now: datetime | None = None) -> list[WriteBackResult]:
        """Beat now, on the caller's thread; raises on failure. Returns newly lost leases.
        `now` overrides Postgres' clock (for tests)."""
        plan = slots.beat_plan(
            self._substrate.queries, self.status, self._book, self.lease_secs, now=now
        )
        lost: list[WriteBackResult] = self._run(plan)
        for result in lost:
            slots.log_lease_lost(result)
            if self._on_lost is not None:
                try:
                    self._on_lost(result.job_id, result)
                except Exception as exc:
                    slots.log_callback_error(exc)
        return lost

    def _run(self, plan: Any) -> Any:
        # One statement batch at a time on the heartbeat's connection: the loop and a
        # caller's beat() (or stop()) may overlap, and a pipeline must not be shared.
        with self._conn_lock, translate_errors():
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            return drive(self._conn, plan)

    def _drop(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _beat_safely(self) -> None:
        try:
            self.beat()
        except Exception as exc:
            self._failures += 1
            verdict = slots.judge_failure(self._failures)
            slots.log_beat_failure(self.status, verdict, exc)
            if verdict.reconnect or self._conn is None or self._conn.broken:
                self._drop()
            return
        if self._failures:
            slots.log_beat_recovered(self.status, self._failures)
        self._failures = 0

    def _main(self) -> None:
        while not self._stopping.is_set():
            try:
                while not self._stopping.is_set():
                    self._beat_safely()
                    self._stopping.wait(self._every)
            except BaseException as exc:  # the loop must outlive its own bugs
                slots.log_loop_restart(self.status, exc)
                self._drop()
                self._stopping.wait(RESTART_DELAY_SECS)


class AsyncSlotHeartbeat(LeaseTracking[asyncio.Event]):
    """`SlotHeartbeat` as an asyncio task: `await start()`, `await stop()`, or
    `async with`. `on_lost` may be a coroutine function."""

    def __init__(
        self,
        substrate: AsyncSubstrate,
        status: SlotStatus,
        *,
        lease_secs: int | None = None,
        on_lost: OnLost | None = None,
        connect: Callable[[], Any] | None = None,
    ) -> None:
        self.status = status
        self.lease_secs = _check_lease(lease_secs)
        self._book = LeaseBook(asyncio.Event)
        self._conn_lock = asyncio.Lock()
        self._substrate = substrate
        self._on_lost = on_lost
        self._connect = connect or self._connect_like_pool
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._failures = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._every = slots.beat_interval(status.interval_secs, self.lease_secs)

    async def _connect_like_pool(self) -> psycopg.AsyncConnection[Any]:
        pool = self._substrate.pool
        conninfo, kwargs = _connect_args(pool)
        conn: psycopg.AsyncConnection[Any] = await pool.connection_class.connect(conninfo, **kwargs)
        return conn

    async def start(self) -> AsyncSlotHeartbeat:
        if self._task is None or self._task.done():
            self._stopping.clear()
            self._task = asyncio.create_task(
                self._main(), name=f"substrate-heartbeat-{self.status.slot_id}"
            )
        return self

    async def stop(self, reason: str = "stopped", timeout: float = 10.0) -> None:  # noqa: ASYNC109
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout)
        with contextlib.suppress(Exception):
            await self._run(slots.gone_plan(self._substrate.queries, self.status, reason))
        await self._drop()

    async def __aenter__(self) -> AsyncSlotHeartbeat:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @_doc(SlotHeartbeat.beat)
    async def beat(self, *, now: datetime | None = None) -> list[WriteBackResult]:
        plan = slots.beat_plan(
            self._substrate.queries, self.status, self._book, self.lease_secs, now=now
        )
        lost: list[WriteBackResult] = await self._run(plan)
        for result in lost:
            slots.log_lease_lost(result)
            if self._on_lost is not None:
                try:
                    outcome = self._on_lost(result.job_id, result)
                    if inspect.isawaitable(outcome):
                        await outcome
                except Exception as exc:
                    slots.log_callback_error(exc)
        return lost

    async def _run(self, plan: Any) -> Any:
        async with self._conn_lock:  # see SlotHeartbeat._run
            with translate_errors():
                if self._conn is None or self._conn.closed:
                    self._conn = await self._connect()
                return await adrive(self._conn, plan)

    async def _drop(self) -> None:
        async with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _beat_safely(self) -> None:
        try:
            await self.beat()
        except Exception as exc:
            self._failures += 1
            verdict = slots.judge_failure(self._failures)
            slots.log_beat_failure(self.status, verdict, exc)
            if verdict.reconnect or self._conn is None or self._conn.broken:
                await self._drop()
            return
        if self._failures:
            slots.log_beat_recovered(self.status, self._failures)
        self._failures = 0

    async def _main(self) -> None:
        while not self._stopping.is_set():
            try:
                while not self._stopping.is_set():
                    await self._beat_safely()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self._every)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the loop must outlive its own bugs
                slots.log_loop_restart(self.status, exc)
                await self._drop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), RESTART_DELAY_SECS)
