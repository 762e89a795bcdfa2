"""`SubstrateIntake` and `AsyncSubstrateIntake`: the bridge between a runtime's tick
loop and the substrate.

Both are thin drivers of the flows in `logic`: they perform the operations a flow asks
for (a claim, a local enqueue, a write-back, lease recovery) on their own connection
pool and local queue, and return what the flow decided. Neither holds a decision of its
own, so the two flavours cannot drift apart.

Nothing here raises into the runtime: `tick()`, `write_back()` and
`lease_recovery_tick()` catch every `Exception` (never `KeyboardInterrupt`,
`SystemExit` or asyncio cancellation), log it through the contract's lines and return.
The pool is built on first use, never in the constructor, so building an intake never
touches the network, and a disabled intake never builds one.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from ..client import AsyncSubstrate, Substrate
from ..errors import InvalidArgument, SubstrateError
from ..liveness import AsyncSlotHeartbeat, SlotHeartbeat
from ..models import JsonValue, RecoveryResult, WriteBackResult
from ..slots import DEFAULT_INTERVAL_SECS, SlotStatus
from ._connect import (
    DEFAULT_MAX_CONNECTIONS,
    ConnectSettings,
    ConnectTracker,
    open_async_pool,
    open_pool,
)
from .config import SubstrateConfig
from .credentials import CredentialResolver, default_resolver
from .lease import AsyncLeaseKeeper, LeaseKeeper, OnLost
from .logic import (
    Claim,
    Complete,
    Enqueue,
    Fail,
    Flow,
    Op,
    Recover,
    RecoveryGate,
    TickResult,
    recovery_crashed,
    recovery_flow,
    tick_crashed,
    tick_flow,
    write_back_crashed,
    write_back_flow,
)
from .tasks import AsyncLocalTaskQueue, LocalTask, LocalTaskQueue

T = TypeVar("T")


def _check_config(config: object) -> SubstrateConfig:
    if not isinstance(config, SubstrateConfig):
        raise InvalidArgument("config", config, "a SubstrateConfig")
    return config


def _disabled() -> SubstrateError:
    return SubstrateError("the substrate intake is disabled (SubstrateConfig.enabled is false)")


def _closed() -> SubstrateError:
    return SubstrateError("the substrate intake is closed")


class _IntakeBase:
    """What both intakes hold and how they print; each adds its client and its lock."""

    def __init__(
        self,
        config: SubstrateConfig,
        local_queue: Any,
        resolve_credential: CredentialResolver | None,
        clock: Callable[[], float],
        max_connections: int,
    ) -> None:
        self.config = _check_config(config)
        self.local_queue = local_queue
        self._resolver = (
            resolve_credential if resolve_credential is not None else default_resolver()
        )
        self._tracker = ConnectTracker()
        self._gate = RecoveryGate(config.lease_recovery_cadence_secs, clock)
        self._max_connections = max_connections
        self._closed = False

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{type(self).__name__}(enabled={c.enabled}, slot_id={c.slot_id!r}, "
            f"kinds={list(c.kinds)!r}, host={c.host!r})"
        )


class SubstrateIntake(_IntakeBase):
    """The intake for a blocking runtime. Thread-safe: one per slot.

    `resolve_credential(credential_id) -> password` replaces the default resolver chain
    (see `substrate_db.intake.credentials`). `clock` (monotonic seconds) paces lease
    recovery; tests replace it. `max_connections` bounds the intake's pool.
    """

    def __init__(
        self,
        config: SubstrateConfig,
        local_queue: LocalTaskQueue,
        *,
        resolve_credential: CredentialResolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        super().__init__(config, local_queue, resolve_credential, clock, max_connections)
        self.local_queue: LocalTaskQueue = local_queue
        self._client: Substrate | None = None
        self._keepers: weakref.WeakSet[LeaseKeeper | SlotHeartbeat] = weakref.WeakSet()
        self._lock = threading.Lock()

    def client(self) -> Substrate:
        """The `Substrate` on the intake's pool, built on first use (the pool connects
        on demand). Raises `SubstrateError` when the intake is disabled or closed."""
        with self._lock:
            if self._closed:
                raise _closed()
            if self._client is None:
                if not self.config.enabled:
                    raise _disabled()
                settings = ConnectSettings(self.config, self._resolver, self._tracker)
                pool = open_pool(settings, self._max_connections)
                self._client = Substrate(pool, schema=self.config.schema_name)
            return self._client

    # -- the runtime's entry points ------------------------------------------------------

    def tick(self) -> TickResult:
        """Claim one job of the configured kinds and enqueue it as a local task.

        Never raises. A failure is a `skip_reason` and a `[substrate] skip` log line;
        an empty claim is silent. Disabled: returns an empty result, touching nothing.
        """
        try:
            return self._drive(tick_flow(self.config, self._tracker))
        except Exception as exc:
            return tick_crashed(exc)

    def write_back(
        self,
        task: LocalTask,
        *,
        ok: bool,
        result: JsonValue = None,
        error: str | BaseException | None = None,
    ) -> WriteBackResult | None:
        """Complete (`ok=True`, storing `result`) or fail (retryably, recording `error`)
        the job a finished local task came from, fenced on the task's claim epoch.

        Tasks from other sources, or without `_substrate_job_id`, are left alone (None).
        A refused write (a stale executor, a cancelled job) is logged and returned; a
        database error is logged and swallowed (None): lease recovery reconciles the job.
        """
        try:
            return self._drive(write_back_flow(task, ok, result, error, self._tracker))
        except Exception as exc:  # a bug: still never take the runtime down
            write_back_crashed(task, exc)
            return None

    def lease_recovery_tick(self, *, now: datetime | None = None) -> RecoveryResult | None:
        """Release expired leases, if this slot is the recovery owner and a cadence has
        passed since the last run, under an advisory lock so only one owner runs at a
        time. Never raises; None when nothing ran. `now` overrides Postgres' clock."""
        try:
            return self._drive(recovery_flow(self.config, self._gate, now, self._tracker))
        except Exception as exc:
            recovery_crashed(exc)
            return None

    def lease_keeper(
        self, *, on_lost: OnLost | None = None, interval: float | None = None
    ) -> LeaseKeeper:
        """A `LeaseKeeper` on the intake's pool with the configured lease (not started).
        `write_back` stops its renewals of a job before writing the job back."""
        keeper = LeaseKeeper(
            self.client(),
            self.config.lease_secs,
            interval=interval,
            on_lost=on_lost,
            tracker=self._tracker,
        )
        with self._lock:
            self._keepers.add(keeper)
        return keeper

    def slot_heartbeat(
        self, *, on_lost: OnLost | None = None, interval_secs: float = DEFAULT_INTERVAL_SECS
    ) -> SlotHeartbeat:
        """A `SlotHeartbeat` for this intake's slot (not started): one round trip per beat
        keeps the slot's liveness row and the leases it tracks, so a runtime that uses it
        needs no `lease_keeper()`. `write_back` stops its renewals of a job first."""
        status = SlotStatus(
            self.config.slot_id or "", self.config.kinds, interval_secs=interval_secs
        )
        heartbeat = SlotHeartbeat(
            self.client(), status, lease_secs=self.config.lease_secs, on_lost=on_lost
        )
        with self._lock:
            self._keepers.add(heartbeat)
        return heartbeat

    def close(self) -> None:
        """Stop the lease keepers made by `lease_keeper()` and close the pool."""
        with self._lock:
            self._closed = True
            keepers, self._keepers = list(self._keepers), weakref.WeakSet()
            client, self._client = self._client, None
        for keeper in keepers:
            keeper.stop()
        if client is not None:
            client.pool.close()

    def __enter__(self) -> SubstrateIntake:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the driver ----------------------------------------------------------------------

    def _drive(self, flow: Flow[T]) -> T:
        try:
            op = next(flow)
            while True:
                try:
                    value = self._perform(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _perform(self, op: Op) -> Any:
        if isinstance(op, Claim):
            return self.client().claim_next_job(op.slot_id, op.kinds, op.lease_secs)
        if isinstance(op, Enqueue):
            return self.local_queue.enqueue_task(op.task)
        if isinstance(op, Complete):
            return self.client().complete_job(op.job_id, op.epoch, op.result)
        if isinstance(op, Fail):
            return self.client().fail_job(op.job_id, op.epoch, op.error)
        if isinstance(op, Recover):
            return self.client().release_expired_leases_exclusive(now=op.now)
        with self._lock:
            keepers = list(self._keepers)
        for keeper in keepers:
            keeper.untrack(op.job_id)
        return None


class AsyncSubstrateIntake(_IntakeBase):
    """The intake for an asyncio runtime: `SubstrateIntake`'s methods, awaited.

    The local queue's `enqueue_task` may be a plain method (e.g. `SQLiteTaskQueue`) or a
    coroutine. Use it from one event loop.
    """

    def __init__(
        self,
        config: SubstrateConfig,
        local_queue: LocalTaskQueue | AsyncLocalTaskQueue,
        *,
        resolve_credential: CredentialResolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        super().__init__(config, local_queue, resolve_credential, clock, max_connections)
        self.local_queue: LocalTaskQueue | AsyncLocalTaskQueue = local_queue
        self._client: AsyncSubstrate | None = None
        self._keepers: weakref.WeakSet[AsyncLeaseKeeper | AsyncSlotHeartbeat] = weakref.WeakSet()
        self._lock = asyncio.Lock()

    async def client(self) -> AsyncSubstrate:
        """See `SubstrateIntake.client`."""
        async with self._lock:
            if self._closed:
                raise _closed()
            if self._client is None:
                if not self.config.enabled:
                    raise _disabled()
                settings = ConnectSettings(self.config, self._resolver, self._tracker)
                pool = await open_async_pool(settings, self._max_connections)
                self._client = AsyncSubstrate(pool, schema=self.config.schema_name)
            return self._client

    async def tick(self) -> TickResult:
        """See `SubstrateIntake.tick`."""
        try:
            return await self._drive(tick_flow(self.config, self._tracker))
        except Exception as exc:
            return tick_crashed(exc)

    async def write_back(
        self,
        task: LocalTask,
        *,
        ok: bool,
        result: JsonValue = None,
        error: str | BaseException | None = None,
    ) -> WriteBackResult | None:
        """See `SubstrateIntake.write_back`."""
        try:
            return await self._drive(write_back_flow(task, ok, result, error, self._tracker))
        except Exception as exc:
            write_back_crashed(task, exc)
            return None

    async def lease_recovery_tick(self, *, now: datetime | None = None) -> RecoveryResult | None:
        """See `SubstrateIntake.lease_recovery_tick`."""
        try:
            return await self._drive(recovery_flow(self.config, self._gate, now, self._tracker))
        except Exception as exc:
            recovery_crashed(exc)
            return None

    async def lease_keeper(
        self, *, on_lost: OnLost | None = None, interval: float | None = None
    ) -> AsyncLeaseKeeper:
        """See `SubstrateIntake.lease_keeper`."""
        keeper = AsyncLeaseKeeper(
            await self.client(),
            self.config.lease_secs,
            interval=interval,
            on_lost=on_lost,
            tracker=self._tracker,
        )
        self._keepers.add(keeper)
        return keeper

    async def slot_heartbeat(
        self, *, on_lost: OnLost | None = None, interval_secs: float = DEFAULT_INTERVAL_SECS
    ) -> AsyncSlotHeartbeat:
        """See `SubstrateIntake.slot_heartbeat`."""
        status = SlotStatus(
            self.config.slot_id or "", self.config.kinds, interval_secs=interval_secs
        )
        heartbeat = AsyncSlotHeartbeat(
            await self.client(), status, lease_secs=self.config.lease_secs, on_lost=on_lost
        )
        self._keepers.add(heartbeat)
        return heartbeat

    async def close(self) -> None:
        """See `SubstrateIntake.close`."""
        async with self._lock:
            self._closed = True
            keepers, self._keepers = list(self._keepers), weakref.WeakSet()
            client, self._client = self._client, None
        for keeper in keepers:
            await keeper.stop()
        if client is not None:
            await client.pool.close()

    async def __aenter__(self) -> AsyncSubstrateIntake:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _drive(self, flow: Flow[T]) -> T:
        try:
            op = next(flow)
            while True:
                try:
                    value = await self._perform(op)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _perform(self, op: Op) -> Any:
        if isinstance(op, Claim):
            return await (await self.client()).claim_next_job(op.slot_id, op.kinds, op.lease_secs)
        if isinstance(op, Enqueue):
            task_id = self.local_queue.enqueue_task(op.task)
            return await task_id if inspect.isawaitable(task_id) else task_id
        if isinstance(op, Complete):
            return await (await self.client()).complete_job(op.job_id, op.epoch, op.result)
        if isinstance(op, Fail):
            return await (await self.client()).fail_job(op.job_id, op.epoch, op.error)
        if isinstance(op, Recover):
            return await (await self.client()).release_expired_leases_exclusive(now=op.now)
        for keeper in list(self._keepers):
            keeper.untrack(op.job_id)
        return None
