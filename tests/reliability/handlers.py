"""Job handlers the worker tests load by name (`--handler reliability.handlers:echo`)."""

from __future__ import annotations

from typing import Any

from substrate_db import ClaimedJob


def echo(job: ClaimedJob) -> Any:
    """Completes the job with its payload and epoch."""
    return {"payload": job.payload, "epoch": job.claim_epoch}
