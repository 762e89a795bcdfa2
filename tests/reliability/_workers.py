"""The ready worker (`substrate_db.worker`) on a background thread, and bounded waits.

`run_worker` is what `substrate-db worker` runs; here it runs on a thread of the test
process so a test can stop it and read its stats. `wait_until` polls a condition with a
deadline: the deadline only turns a hang into a failure with a message, it is never
the thing being tested.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from substrate_db.worker import Handler, Worker, WorkerOptions, WorkerStats, run_worker


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll `condition` until it returns something truthy; fail saying `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(0.05)


class ThreadWorker:
    """`run_worker` on a daemon thread; `stop()` asks it to drain and returns its stats."""

    def __init__(self, conninfo: str, handler: Handler, options: WorkerOptions, **kw: Any):
        self._args = (conninfo, handler, options)
        self._kw = kw
        self._ready = threading.Event()
        self._worker: Worker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats: WorkerStats | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="test-worker", daemon=True)

    def _main(self) -> None:
        def ready(worker: Worker) -> None:
            self._worker, self._loop = worker, asyncio.get_running_loop()
            self._ready.set()

        try:
            self.stats = run_worker(*self._args, on_ready=ready, **self._kw)
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self._ready.set()

    def start(self) -> ThreadWorker:
        self._thread.start()
        assert self._ready.wait(30), "the worker did not start"
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, *, hurry: bool = False, timeout: float = 60.0) -> WorkerStats:
        if self._worker is not None and self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(lambda: self._worker.stop(hurry=hurry))  # type: ignore[union-attr]
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the worker did not stop"
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats
