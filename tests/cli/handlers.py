"""Sample handlers for the worker tests (imported from the current directory, as users'
handlers are: the tests run the worker with this directory as cwd)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from substrate_db.models import ClaimedJob
from substrate_db.worker import FailJob


def echo(job: ClaimedJob) -> Any:
    """Returns the payload as the result."""
    return {"echo": job.payload}


def noop(job: ClaimedJob) -> None:
    return None


async def async_echo(job: ClaimedJob) -> Any:
    await asyncio.sleep(0)
    return {"echo": job.payload, "async": True}


def flaky(job: ClaimedJob) -> Any:
    """Fails jobs whose payload says so; `permanent` ones are not retried."""
    if job.payload.get("fail") == "permanent":
        raise FailJob("permanently broken", retryable=False)
    if job.payload.get("fail"):
        raise RuntimeError(f"boom {job.id}")
    return "ok"


def slow(job: ClaimedJob) -> Any:
    """Sleeps `secs` from the payload (a thread handler)."""
    time.sleep(float(job.payload.get("secs", 0.5)))
    return "slept"


def not_json(job: ClaimedJob) -> Any:
    return {"when": object()}
