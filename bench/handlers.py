"""Handlers for the worker scenarios (`substrate-db worker --handler bench.handlers:...`).

The bench measures the worker's own cost, so the handlers do nothing, or only note when
they ran.
"""

from __future__ import annotations

import time

from substrate_db import ClaimedJob


async def noop(job: ClaimedJob) -> None:
    """A no-op coroutine: runs on the worker's loop, no thread hand-off."""
    return None


def noop_sync(job: ClaimedJob) -> None:
    """A no-op plain function: runs in one of the worker's threads."""
    return None


async def stamp(job: ClaimedJob) -> dict[str, float]:
    """When the job reached its handler (wall clock, comparable across processes on one
    machine): the latency scenario subtracts the enqueue time carried in the payload."""
    return {"ran_at": time.time()}
