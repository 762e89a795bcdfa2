"""`LeaseKeeper`: the heartbeat that keeps the leases of in-flight jobs alive.

A keeper tracks `(job id, claim epoch)` pairs and, every `lease_secs / 3` seconds,
extends all of their leases in one `extend_leases` statement. A refused extension
(`stale_epoch`: the job was taken back and claimed again; `not_running`: it was
cancelled or finished; `not_found`) means the executor lost the job: the keeper stops
renewing it, marks it lost (`lost(job_id)`, and the `Event` that `track()` returned is
set) and calls `on_lost(job_id, result)`, so a long job can stop instead of running on
for nobody. A database error during a beat is logged and the keeper keeps beating: the
next beat may still be inside the lease.

The intake never extends a lease by itself; a runtime starts a keeper for the jobs it
runs (`SubstrateIntake.lease_keeper()`), and any other code can use one with any
`Substrate`. `LeaseKeeper` runs in a thread, `AsyncLeaseKeeper` in an asyncio task;
both keep their state in a `LeaseBook` and decide in `beat_flow`, which hold no I/O.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from .. import loglines
from ..client import AsyncSubstrate, Substrate
from ..errors import InvalidArgument
from ..leases import E, LeaseBook, LeaseTracking
from ..models import ClaimedJob, WriteBackResult
from ._connect import ConnectTracker, one_line
from .logic import explain
from .tasks import LocalTask

log = loglines.logger


LeaseRef = ClaimedJob | LocalTask | tuple[int, int]
"""What `track()` takes: a claimed job, the local task made from one, or (id, epoch)."""

OnLost = Callable[[int, WriteBackResult], Any]
"""`on_lost(job_id, result)`; for `AsyncLeaseKeeper` it may be a coroutine function."""


def default_interval(lease_secs: int) -> float:
    """lease / 3: two beats may fail before the lease runs out (PgQueuer #430 shows what
    a heartbeat interval equal to the lease does)."""
    return lease_secs / 3


@dataclass(frozen=True, slots=True)
class Extend:
    """`extend_leases(jobs, lease_secs, now=now)`: one result per job back."""

    jobs: list[tuple[int, int]]
    lease_secs: int
    now: datetime | None


def beat_flow(
    book: LeaseBook[Any],
    lease_secs: int,
    now: datetime | None,
    tracker: ConnectTracker | None = None,
) -> Generator[Extend, Any, list[WriteBackResult]]:
    """One heartbeat: renew every due lease in one statement; return the newly lost.
    Never raises: a failed beat is logged and the next one tries again."""
    jobs = book.due()
    if not jobs:
        return []
    try:
        results: list[WriteBackResult] = yield Extend(jobs, lease_secs, now)
    except Exception as exc:
        log.warning(loglines.lease_keeper_error(explain(exc, tracker)))
        return []
    lost = book.settle(results)
    for result in lost:
        log.warning(loglines.lease_lost(result.job_id, result.expected_epoch, str(result.reason)))
    return lost


def _check_timing(lease_secs: int, interval: float | None) -> float:
    if isinstance(lease_secs, bool) or not isinstance(lease_secs, int) or lease_secs < 1:
        raise InvalidArgument("lease_secs", lease_secs, "an integer >= 1")
    if interval is None:
        return default_interval(lease_secs)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
        raise InvalidArgument("interval", interval, "a number of seconds > 0")
    return float(interval)


class _KeeperBase(LeaseTracking[E]):
    """Tracking over the keeper's book (shared with `SlotHeartbeat`), and the settings
    both keepers check and keep alike."""

    _book: LeaseBook[E]

    def _settings(
        self,
        lease_secs: int,
        interval: float | None,
        on_lost: OnLost | None,
        name: str,
        tracker: ConnectTracker | None,
        event: Callable[[], E],
    ) -> None:
        self.interval = _check_timing(lease_secs, interval)
        self.lease_secs = lease_secs
        self._tracker = tracker
        self._on_lost = on_lost
        self._name = name
        self._book = LeaseBook(event)


class LeaseKeeper(_KeeperBase[threading.Event]):
    """Renews the leases of tracked jobs from a daemon thread; see the module docstring.

    `interval` defaults to lease_secs / 3. `on_lost(job_id, result)` runs in the
    keeper's thread; an exception it raises is logged and ignored. `tracker` is the
    intake's connection tracker (set by `SubstrateIntake.lease_keeper()`), so a failed
    beat's log line names the cause of a connection failure.
    """

    def __init__(
        self,
        substrate: Substrate,
        lease_secs: int,
        *,
        interval: float | None = None,
        on_lost: OnLost | None = None,
        name: str = "substrate-lease-keeper",
        tracker: ConnectTracker | None = None,
    ) -> None:
        self._settings(lease_secs, interval, on_lost, name, tracker, threading.Event)
        self._substrate = substrate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, *, now: datetime | None = None) -> list[WriteBackResult]:
        """One heartbeat now (the thread calls this every `interval`); returns the
        refusals that marked jobs lost. `now` overrides Postgres' clock, for tests."""
        flow = beat_flow(self._book, self.lease_secs, now, self._tracker)
        try:
            op = next(flow)
            while True:
                try:
                    value = self._substrate.extend_leases(op.jobs, op.lease_secs, now=op.now)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(value)
        except StopIteration as stop:
            lost: list[WriteBackResult] = stop.value
        for result in lost:
            self._report(result)
        return lost

    def _report(self, result: WriteBackResult) -> None:
        if self._on_lost is None:
            return
        try:
            self._on_lost(result.job_id, result)
        except Exception as exc:
            log.error(loglines.callback_error("on_lost", one_line(exc)), exc_info=exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # a bug: keep the heartbeat alive regardless
                log.error(loglines.lease_keeper_error(one_line(exc)), exc_info=exc)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> LeaseKeeper:
        """Start the heartbeat thread (a daemon: it never keeps a process alive)."""
        if self.running:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop beating and wait for the thread (a beat in progress finishes first)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class AsyncLeaseKeeper(_KeeperBase[asyncio.Event]):
    """The asyncio flavour of `LeaseKeeper`: the same methods, beating in a task.

    `start()` needs a running event loop; `on_lost` may be a plain or a coroutine
    function.
    """

    def __init__(
        self,
        substrate: AsyncSubstrate,
        lease_secs: int,
        *,
        interval: float | None = None,
        on_lost: OnLost | None = None,
        name: str = "substrate-lease-keeper",
        tracker: ConnectTracker | None = None,
    ) -> None:
        self._settings(lease_secs, interval, on_lost, name, tracker, asyncio.Event)
        self._substrate = substrate
        self._task: asyncio.Task[None] | None = None

    async def beat(self, *, now: datetime | None = None) -> list[WriteBackResult]:
        """One heartbeat now; see `LeaseKeeper.beat`."""
        flow = beat_flow(self._book, self.lease_secs, now, self._tracker)
        try:
            op = next(flow)
            while True:
                try:
                    value = await self._substrate.extend_leases(op.jobs, op.lease_secs, now=op.now)
                except Exception as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(value)
        except StopIteration as stop:
            lost: list[WriteBackResult] = stop.value
        for result in lost:
            await self._report(result)
        return lost

    async def _report(self, result: WriteBackResult) -> None:
        if self._on_lost is None:
            return
        try:
            outcome = self._on_lost(result.job_id, result)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:
            log.error(loglines.callback_error("on_lost", one_line(exc)), exc_info=exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except Exception as exc:  # a bug: keep the heartbeat alive regardless
                log.error(loglines.lease_keeper_error(one_line(exc)), exc_info=exc)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> AsyncLeaseKeeper:
        """Start the heartbeat task on the running event loop."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)
        return self

    async def stop(self) -> None:
        """Cancel the heartbeat task and wait for it to end."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # Our own cancellation of the task; re-raise if *we* are being cancelled.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def __aenter__(self) -> AsyncLeaseKeeper:
        return self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


__all__ = [
    "AsyncLeaseKeeper",
    "LeaseBook",
    "LeaseKeeper",
    "LeaseRef",
    "OnLost",
    "beat_flow",
    "default_interval",
]
