"""The ready worker: claim jobs in batches, run a handler, heartbeat, write back in groups.

One implementation, on asyncio. `Worker` runs inside your event loop; `run_worker()` is
the blocking entry point (`substrate-db worker` uses it), which starts a loop for it.
The handler is a plain function (run in one of `concurrency` threads) or a coroutine
function (run on the loop); it is called with the `ClaimedJob`. What it returns is the
job's result (JSON); what it raises fails the job (retried with backoff while attempts
remain). Raise `FailJob` to choose: not retryable, or retried after a given delay.

How it goes fast (issue 5's targets are ratios to a batch SQL ceiling):

- Claims are batched: one `claim_jobs` for up to `batch_size` jobs, as many as there are
  free slots. While handlers run, the next claim is already under way.
- Write-backs use group commit: finished jobs wait a few milliseconds (or until a batch
  fills, or until nothing else is running) and go back in one `complete_jobs` and one
  `fail_jobs` statement. A job counts against `concurrency` until its write-back landed,
  so memory stays flat however far the database falls behind.
- Sync handlers run on daemon threads fed by a queue; finished jobs come back to the
  loop in bunches (one loop wake-up for all jobs finished meanwhile, not one per job).

Safety:

- The worker is a slot (`substrate_db.liveness.AsyncSlotHeartbeat`, on a connection of
  its own): each beat, every `lease_secs / 3` (30 s at most), upserts its row in the
  `slots` table (shown by `substrate-db stats`: healthy, draining, gone) and extends the
  leases of its running jobs in the same round trip. A refused extension means the job
  was reclaimed or cancelled: the worker marks it lost, cancels a coroutine handler, and
  never writes it back (the epoch fence would refuse it anyway).
- Idle, it waits for the insert notification (LISTEN on `<schema>_jobs`, filtered by
  kind) and polls once a second as a fallback, never faster; behind PgBouncer in
  transaction mode (`listen=False`) it only polls.
- On `stop()` (SIGTERM/SIGINT for `run_worker`) it stops claiming, lets in-flight
  handlers finish for up to `grace_secs`, writes everything back, and returns. Jobs still
  running after the grace period are released at once: failed as retryable with
  `retry_in=0`, so another worker can claim them immediately (this counts the attempt,
  as lease recovery would; we release rather than wait for lease recovery so that a
  deploy does not leave jobs idle for a whole lease). A second signal skips the grace.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib
import inspect
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

from . import core, loglines
from .client import AsyncSubstrate
from .core import Listen, Plan, WaitNotify
from .errors import DatabaseError, InvalidArgument, ResultTooLarge, SubstrateError
from .liveness import AsyncSlotHeartbeat
from .models import ClaimedJob, WriteBackResult
from .slots import SlotStatus

logger = logging.getLogger("substrate_db.worker")

DEFAULT_CONCURRENCY: Final = 10
DEFAULT_BATCH_SIZE: Final = 50
"""Most jobs per claim and per write-back statement."""
DEFAULT_LEASE_SECS: Final = 60
DEFAULT_GRACE_SECS: Final = 25.0
"""Under Kubernetes' default 30 s between SIGTERM and SIGKILL, with room to write back."""
POLL_SECS: Final = 1.0
"""Idle re-claim period when no notification arrives (the issue: within a second)."""
LINGER_SECS: Final = 0.005
"""How long a finished job may wait for others to share its write-back statement."""
RETRY_BACKOFF_MAX: Final = 5.0
"""Longest pause between retries after a database error."""

Handler = Callable[[ClaimedJob], Any]
"""A function or coroutine function taking the claimed job and returning its result."""


class FailJob(Exception):
    """Raise from a handler to fail the job with control over the retry.

    `retryable=False` ends the job `failed` now; `retry_in` (seconds) sets when it runs
    again instead of the exponential backoff.
    """

    def __init__(self, message: str, *, retryable: bool = True, retry_in: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_in = retry_in


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How a worker claims and runs jobs. Every field is checked by `Worker`."""

    kinds: Sequence[str]
    """Job kinds to claim."""
    concurrency: int = DEFAULT_CONCURRENCY
    """Most jobs held at once (running, or finished and waiting for their write-back);
    also the number of threads for a sync handler."""
    batch_size: int = DEFAULT_BATCH_SIZE
    """Most jobs per claim statement and per write-back statement."""
    lease_secs: int = DEFAULT_LEASE_SECS
    """Lease of each claim; extended every lease_secs / 3 while the job is held."""
    grace_secs: float = DEFAULT_GRACE_SECS
    """On stop, how long in-flight handlers may still run before their jobs are released."""
    slot_id: str = ""
    """Who claims (jobs.claimed_by); default `<hostname>:<pid>`."""
    listen: bool = True
    """Wait for insert notifications when idle. False behind PgBouncer (transaction mode)."""
    poll_secs: float = POLL_SECS
    """Idle polling period (the fallback when no notification comes)."""
    linger_secs: float = LINGER_SECS
    """Group commit window for write-backs."""
    burst: bool = False
    """Return once no job is claimable and none is held (drain a backlog, then exit)."""


@dataclasses.dataclass
class WorkerStats:
    """What a worker did. `stale` write-backs were refused by the fence; `lost` jobs had
    their lease taken (reclaimed or cancelled); `released` were given back on stop."""

    slot_id: str
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    stale: int = 0
    lost: int = 0
    released: int = 0
    writeback_errors: int = 0
    elapsed_secs: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class _Held:
    """A job this worker holds: claimed, not yet written back."""

    job: ClaimedJob
    lost: bool = False
    finished: bool = False
    task: asyncio.Task[None] | None = None


@dataclasses.dataclass(slots=True)
class _Outcome:
    job: ClaimedJob
    ok: bool
    value: Any = None
    error: BaseException | str | None = None
    retryable: bool = True
    retry_in: float | None = None


def _default_slot_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _is_async(handler: Handler) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - a callable object's method
    return call is not None and inspect.iscoroutinefunction(call)


def _outcome(job: ClaimedJob, value: Any = None, exc: BaseException | None = None) -> _Outcome:
    """What a handler's return value or exception means for the job."""
    if exc is None:
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited: silence the warning, the error says why
            return _Outcome(
                job,
                False,
                error="the handler returned an awaitable: declare it `async def`",
                retryable=False,
            )
        try:
            core.to_json("result", value)
        except InvalidArgument as bad:
            return _Outcome(job, False, error=f"handler result: {bad}", retryable=False)
        return _Outcome(job, True, value=value)
    if isinstance(exc, FailJob):
        return _Outcome(
            job, False, error=str(exc) or "FailJob", retryable=exc.retryable, retry_in=exc.retry_in
        )
    return _Outcome(job, False, error=exc)


class _Threads:
    """Daemon threads running a sync handler. Daemon, so a handler that never returns
    cannot keep the process alive after the worker released its job and returned.
    Finished jobs are handed to the loop in bunches: one call_soon_threadsafe while the
    loop has not yet collected the previous ones."""

    def __init__(
        self,
        handler: Handler,
        size: int,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[_Outcome]], None],
    ) -> None:
        self._handler = handler
        self._loop = loop
        self._deliver = deliver
        self._inbox: queue.SimpleQueue[ClaimedJob | None] = queue.SimpleQueue()
        self._done: collections.deque[_Outcome] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._threads = [
            threading.Thread(target=self._main, name=f"substrate-worker-{i}", daemon=True)
            for i in range(size)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: ClaimedJob) -> None:
        self._inbox.put(job)

    def close(self) -> None:
        for _ in self._threads:
            self._inbox.put(None)

    def _main(self) -> None:
        while (job := self._inbox.get()) is not None:
            try:
                outcome = _outcome(job, self._handler(job))
            except BaseException as exc:
                outcome = _outcome(job, exc=exc)
            with self._lock:
                self._done.append(outcome)
                schedule = not self._scheduled
                self._scheduled = True
            if schedule:
                try:
                    self._loop.call_soon_threadsafe(self._collect)
                except RuntimeError:
                    return  # the loop is closed: the worker has returned

    def _collect(self) -> None:
        with self._lock:
            done = list(self._done)
            self._done.clear()
            self._scheduled = False
        self._deliver(done)


def listen_plan(channel: str, kinds: Iterable[str], wake: Callable[[], None]) -> Plan[None]:
    """LISTEN for inserts and call `wake()` when one names a kind of ours. Never returns:
    the worker cancels it. The payload lists the kinds inserted, cut at 7900 bytes by
    the trigger, so a payload that long may have lost ours: it wakes too."""
    wanted = frozenset(kinds)
    yield Listen(channel)
    while True:
        payloads = yield WaitNotify(timeout=60.0)
        for payload in payloads:
            if len(payload) >= 7900 or wanted.intersection(payload.split(",")):
                wake()
                break


class Worker:
    """A worker bound to an `AsyncSubstrate`. `await worker.run()` returns `WorkerStats`
    after `stop()` (or, with `burst`, once the backlog is drained)."""

    def __init__(self, substrate: AsyncSubstrate, handler: Handler, options: WorkerOptions):
        kinds = core.check_kinds(options.kinds)
        self._opts = dataclasses.replace(
            options,
            kinds=kinds,
            concurrency=core.check_int("concurrency", options.concurrency, 1, 100_000),
            batch_size=core.check_int("batch_size", options.batch_size, 1, 10_000),
            lease_secs=core.check_int("lease_secs", options.lease_secs, 3, core.MAX_LEASE_SECS),
            slot_id=core.check_name("slot_id", options.slot_id or _default_slot_id()),
        )
        for name in ("grace_secs", "poll_secs", "linger_secs"):
            value = getattr(options, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidArgument(name, value, "a number of seconds >= 0")
        if not callable(handler):
            raise InvalidArgument("handler", handler, "a function or coroutine function")
        self._db = substrate
        self._handler = handler
        self._async = _is_async(handler)
        self.stats = WorkerStats(slot_id=self._opts.slot_id)
        self._held: dict[int, _Held] = {}
        self._pending: list[_Outcome] = []
        self._stopping = False
        self._hurry = False
        self._threads: _Threads | None = None
        self._status = SlotStatus(self._opts.slot_id, kinds)
        self._beat: AsyncSlotHeartbeat | None = None
        # Created in run(), on the loop that runs the worker.
        self._wake: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._flush: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None

    @property
    def slot_id(self) -> str:
        return self._opts.slot_id

    @property
    def options(self) -> WorkerOptions:
        return self._opts

    def stop(self, *, hurry: bool = False) -> None:
        """Stop claiming and drain (call from the worker's loop, e.g. a signal handler).
        `hurry=True` (or a second call) skips the grace period."""
        if self._stopping:
            hurry = True
        if not self._stopping:
            self._status.mark_draining("stop requested: draining in-flight jobs")
        self._stopping = True
        self._hurry = self._hurry or hurry
        for event in (self._wake, self._room, self._stop_event, self._flush):
            if event is not None:
                event.set()

    # -- the loops ------------------------------------------------------------------------

    async def run(self) -> WorkerStats:
        """Claim and run jobs until stopped; then drain and return what happened."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        self._wake, self._room = asyncio.Event(), asyncio.Event()
        self._flush, self._stop_event = asyncio.Event(), asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        if not self._async:
            self._threads = _Threads(self._handler, self._opts.concurrency, loop, self._deliver)
        self._beat = await AsyncSlotHeartbeat(
            self._db, self._status, lease_secs=self._opts.lease_secs, on_lost=self._lose
        ).start()
        helpers = [asyncio.create_task(self._writer(), name="substrate-writer")]
        listener = None
        if self._opts.listen:
            listener = asyncio.create_task(self._listen(), name="substrate-listen")
        try:
            await self._fetch()
            await self._drain()
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listener
            await self._beat.stop("drained" if self._stopping else "burst done")
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._threads is not None:
                self._threads.close()
            self.stats.elapsed_secs = round(time.monotonic() - started, 3)
        return self.stats

    async def _fetch(self) -> None:
        """Claim while there is room; idle, wait for a notification or the poll period."""
        assert self._wake is not None and self._room is not None
        opts = self._opts
        failures = 0
        while not self._stopping:
            free = opts.concurrency - len(self._held)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            want = min(free, opts.batch_size)
            self._wake.clear()  # before the claim: a notification during it is kept
            try:
                jobs = await self._db.claim_jobs(opts.slot_id, opts.kinds, want, opts.lease_secs)
                failures = 0
            except DatabaseError as exc:
                failures += 1
                logger.warning("[substrate] claim error=%s slot=%s", exc, opts.slot_id)
                await self._sleep(min(RETRY_BACKOFF_MAX, 0.1 * 2**failures))
                continue
            self.stats.claimed += len(jobs)
            for job in jobs:
                self._start(job)
            if len(jobs) == want:
                continue  # there may be more: claim again as soon as there is room
            if opts.burst:
                if not jobs and not self._held:
                    return
                # Wait for room (or the poll) before looking again, not for an insert.
                self._room.clear()
                await self._wait_any(self._room, opts.poll_secs)
                continue
            await self._wait_any(self._wake, opts.poll_secs)

    def _start(self, job: ClaimedJob) -> None:
        if logger.isEnabledFor(logging.DEBUG):  # per job: do not build the line for nothing
            logger.debug(loglines.claim(self._opts.slot_id, self._opts.kinds, job.id))
        held = self._held[job.id] = _Held(job)
        assert self._beat is not None
        self._beat.track(job)
        if self._threads is not None:
            self._threads.submit(job)
        else:
            held.task = asyncio.create_task(self._run_async(job))

    async def _run_async(self, job: ClaimedJob) -> None:
        try:
            value = await self._handler(job)
        except asyncio.CancelledError:
            # Lost lease or released on stop: nothing to write back.
            self._deliver([_Outcome(job, False, error="cancelled")])
            raise
        except Exception as exc:
            self._deliver([_outcome(job, exc=exc)])
        else:
            self._deliver([_outcome(job, value)])

    def _deliver(self, outcomes: list[_Outcome]) -> None:
        """Finished handlers, on the loop: queue their write-back (or drop a lost one)."""
        assert self._flush is not None
        for outcome in outcomes:
            held = self._held.get(outcome.job.id)
            if held is None or held.job.claim_epoch != outcome.job.claim_epoch:
                continue  # released on stop meanwhile
            held.finished = True
            # No more renewals: a beat racing the write-back cannot report a false loss.
            assert self._beat is not None
            self._beat.untrack(outcome.job.id)
            if held.lost:
                self._forget(outcome.job.id)
                continue
            self._pending.append(outcome)
        if self._pending:
            self._flush.set()

    def _forget(self, job_id: int) -> None:
        """Drop a held job (its lease is no longer tracked: `_deliver` or `_release`
        untracked it) and make room for another."""
        assert self._room is not None
        self._held.pop(job_id, None)
        self._room.set()

    async def _writer(self) -> None:
        """Group commit: gather finished jobs briefly, then one statement per kind of
        write-back. Flushes at once when a batch is full or every held job is finished
        (nobody else is coming)."""
        assert self._flush is not None
        opts = self._opts
        while True:
            await self._flush.wait()
            self._flush.clear()
            if not self._pending:
                continue
            if (
                len(self._pending) < opts.batch_size
                and len(self._pending) < len(self._held)
                and opts.linger_secs > 0
                and not self._stopping
            ):
                await asyncio.sleep(opts.linger_secs)
            while self._pending:
                batch = self._pending[: opts.batch_size]
                del self._pending[: opts.batch_size]
                await self._write(batch)

    async def _write(self, batch: list[_Outcome]) -> None:
        done = [o for o in batch if o.ok]
        failed = [o for o in batch if not o.ok]
        if done:
            results = await self._with_retry(
                "complete",
                done,
                lambda: self._complete([(o.job.id, o.job.claim_epoch, o.value) for o in done]),
            )
            self._account(done, results, "complete")
        if failed:
            items = [
                (o.job.id, o.job.claim_epoch, o.error or "failed", o.retryable, o.retry_in)
                for o in failed
            ]
            for o in failed:
                logger.warning(loglines.fail(o.job.id, o.job.claim_epoch, _reason(o.error)))
            results = await self._with_retry("fail", failed, lambda: self._db.fail_jobs(items))
            self._account(failed, results, "fail")
        for o in batch:
            self._forget(o.job.id)

    async def _complete(self, items: list[tuple[int, int, Any]]) -> list[WriteBackResult]:
        try:
            return await self._db.complete_jobs(items)
        except ResultTooLarge as exc:
            # The oversized ones were failed (not retryable) by the same call.
            return [r for r in exc.results if isinstance(r, WriteBackResult)]

    async def _with_retry(
        self,
        what: str,
        outcomes: list[_Outcome],
        call: Callable[[], Awaitable[list[WriteBackResult]]],
    ) -> list[WriteBackResult] | None:
        """Retry a write-back through transient database errors, for as long as the
        leases could still be valid; after that lease recovery owns the jobs anyway."""
        deadline = time.monotonic() + self._opts.lease_secs
        attempt = 0
        while True:
            try:
                return await call()
            except DatabaseError as exc:
                attempt += 1
                if time.monotonic() > deadline or (self._hurry and attempt > 2):
                    self.stats.writeback_errors += len(outcomes)
                    for o in outcomes:
                        logger.error(loglines.write_back_error(exc, o.job.id))
                    return None
                logger.warning(
                    "[substrate] %s error=%s (retrying %d jobs)", what, exc, len(outcomes)
                )
                await asyncio.sleep(min(RETRY_BACKOFF_MAX, 0.05 * 2**attempt))

    def _account(
        self, outcomes: list[_Outcome], results: list[WriteBackResult] | None, what: str
    ) -> None:
        if results is None:
            return
        for o, r in zip(outcomes, results, strict=True):
            self._status.record_outcome(r.ok and what == "complete")
            if r.ok:
                if what == "complete":
                    self.stats.completed += 1
                else:
                    self.stats.failed += 1
            else:
                self.stats.stale += 1
                line = loglines.complete_failed if what == "complete" else loglines.fail_failed
                logger.warning(line(o.job.id, o.job.claim_epoch, r.reason.value))

    def _lose(self, job_id: int, result: WriteBackResult) -> None:
        """A beat found this job's lease taken (the heartbeat logged the line)."""
        held = self._held.get(job_id)
        if held is None or held.finished or held.job.claim_epoch != result.expected_epoch:
            return  # its write-back is queued or done: that result tells what happened
        held.lost = True
        self.stats.lost += 1
        if held.task is not None:
            held.task.cancel()

    async def _listen(self) -> None:
        """Keep a LISTEN connection; on failure, retry now and then (polling covers)."""
        assert self._wake is not None
        wake = self._wake.set
        channel = f"{self._db.schema}_jobs"
        failures = 0
        while True:
            try:
                await self._db.run(listen_plan(channel, self._opts.kinds, wake))
            except (DatabaseError, SubstrateError) as exc:
                failures += 1
                logger.debug("[substrate] listen error=%s", exc)
                await asyncio.sleep(min(30.0, 0.5 * 2**failures))
            else:  # pragma: no cover - the plan never returns
                return

    async def _drain(self) -> None:
        """After stop: let handlers finish within the grace period, release the rest,
        and write everything back."""
        assert self._flush is not None and self._room is not None
        deadline = time.monotonic() + (0 if self._hurry else self._opts.grace_secs)
        while any(not h.finished and not h.lost for h in self._held.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._hurry:
                break
            self._room.clear()
            await self._wait_any(self._room, min(remaining, 0.5))
        running = [h for h in self._held.values() if not h.finished and not h.lost]
        if running:
            await self._release(running)
        # Everything else has finished: let the writer put it back. Handlers of lost
        # jobs that are still running (threads cannot be interrupted) are not waited for.
        self._flush.set()
        while any(h.finished or not h.lost for h in self._held.values()):
            self._room.clear()
            await self._wait_any(self._room, 0.5)

    async def _release(self, running: list[_Held]) -> None:
        grace = self._opts.grace_secs
        reason = (
            f"released: worker {self._opts.slot_id} stopped before the job finished "
            f"(grace {grace:g} s)"
        )
        logger.warning("[substrate] releasing %d unfinished job(s) on stop", len(running))
        items = [(h.job.id, h.job.claim_epoch, reason, True, 0.0) for h in running]
        for h in running:
            h.lost = True  # a late outcome must not be written back
            if h.task is not None:
                h.task.cancel()
        try:
            results = await self._db.fail_jobs(items)
        except DatabaseError as exc:
            logger.error("[substrate] release error=%s (lease recovery will take them)", exc)
            results = []
        self.stats.released += sum(1 for r in results if r.ok)
        assert self._beat is not None
        for h in running:
            self._beat.untrack(h.job.id)
            self._forget(h.job.id)

    async def _wait_any(self, event: asyncio.Event, secs: float) -> None:
        """Wait for `event`, a stop, or `secs` seconds."""
        assert self._stop_event is not None
        waits = {
            asyncio.ensure_future(event.wait()),
            asyncio.ensure_future(self._stop_event.wait()),
        }
        try:
            await asyncio.wait(waits, timeout=secs, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _sleep(self, secs: float) -> None:
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), secs)


def _reason(error: BaseException | str | None) -> str:
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    return " ".join(str(error).split())[:200]


# -- the blocking entry point ------------------------------------------------------------


def load_handler(spec: str) -> Handler:
    """Import `module:function` (dots after the colon reach attributes). The current
    directory is importable, as for `python -m`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument("handler", spec, "'module:function'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:
        raise InvalidArgument(
            "handler", spec, f"importable ({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from None
    if not callable(target):
        raise InvalidArgument("handler", spec, "a function or coroutine function")
    return target  # type: ignore[no-any-return]


async def serve(
    conninfo: str,
    handler: Handler,
    options: WorkerOptions,
    *,
    schema: str = "substrate",
    pgbouncer: bool = False,
    connect_kwargs: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    install_signal_handlers: bool = True,
    on_ready: Callable[[Worker], None] | None = None,
) -> WorkerStats:
    """Connect, run a worker until SIGTERM/SIGINT (or burst end), return its stats.

    `connect_kwargs` are extra connection parameters, or a callable returning them,
    called for each new connection (a password resolved afresh, so rotation needs no
    restart)."""
    options = dataclasses.replace(options, listen=options.listen and not pgbouncer)
    async with await _connect(conninfo, schema, pgbouncer, connect_kwargs) as db:
        worker = Worker(db, handler, options)
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, _on_signal, worker, sig)
                installed.append(sig)
        try:
            if on_ready is not None:
                on_ready(worker)
            return await worker.run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


async def _connect(
    conninfo: str,
    schema: str,
    pgbouncer: bool,
    connect_kwargs: dict[str, Any] | Callable[[], dict[str, Any]] | None,
) -> AsyncSubstrate:
    # One connection each for claims, write-backs and the listener, and one spare for a
    # release on stop (the slot heartbeat has a connection of its own).
    return await AsyncSubstrate.connect(
        conninfo,
        schema=schema,
        pgbouncer=pgbouncer,
        kwargs=connect_kwargs,
        min_size=2,
        max_size=4,
        name="substrate-worker",
    )


def _on_signal(worker: Worker, sig: signal.Signals) -> None:
    logger.warning(
        "[substrate] %s: worker %s stops claiming and drains (grace %g s; again to skip)",
        sig.name,
        worker.slot_id,
        worker.options.grace_secs,
    )
    worker.stop()


def run_worker(
    conninfo: str, handler: Handler, options: WorkerOptions, **kwargs: Any
) -> WorkerStats:
    """Blocking: `serve()` on a new event loop. Returns when the worker stopped."""
    return asyncio.run(serve(conninfo, handler, options, **kwargs))
