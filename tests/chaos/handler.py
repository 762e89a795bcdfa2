"""The chaos run's job handler, loaded by `substrate-db worker --handler chaos.handler:handle`.

Each job's effect is one row in `chaos_effects`, written through the idempotency store
in the same transaction as the store's key (`chaos-effect-<job id>`: one key per job, not
per claim). A job whose lease expired mid-flight and was claimed again therefore runs
its handler twice but applies its effect once: the second run finds the key and gets
the first run's result back. The run checks exactly that afterwards.

A run whose effect was skipped that way leaves a row in `chaos_skipped`, for the report.
The result carries the executor's claim epoch, so the run can prove that every
completion was written by the executor holding the job's current epoch.

Payload flags: `fail` fails the job for good; `flaky` fails the first attempt
(retryable, due at once). A lost effect-store connection (killed by the chaos, or
Postgres restarting) fails the attempt retryably and due at once, like a handler whose
dependency blipped; it never takes the worker down.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import psycopg

from substrate_db import ClaimedJob, SubstrateError
from substrate_db.intake.idempotency import IdempotencyStore
from substrate_db.worker import FailJob

DSN_ENV = "CHAOS_DSN"
_local = threading.local()
_store = IdempotencyStore()


def _connection() -> psycopg.Connection[Any]:
    conn: psycopg.Connection[Any] | None = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        conn = psycopg.connect(os.environ[DSN_ENV], autocommit=True, connect_timeout=3)
        _local.conn = conn
    return conn


def handle(job: ClaimedJob) -> dict[str, int]:
    time.sleep(random.uniform(0.005, 0.04))  # the work
    epoch = job.claim_epoch
    if job.payload.get("fail"):
        raise FailJob(f"permanent failure e{epoch}", retryable=False)
    if job.payload.get("flaky") and job.attempts == 1:
        raise FailJob(f"flaky e{epoch}", retry_in=0)
    try:
        conn = _connection()

        def effect() -> dict[str, int]:
            conn.execute(
                "INSERT INTO public.chaos_effects (job_id, epoch, pid) VALUES (%s, %s, %s)",
                [job.id, epoch, os.getpid()],
            )
            return {"epoch": epoch}

        ran: list[bool] = []
        _store.run_once(conn, f"chaos-effect-{job.id}", lambda: ran.append(True) or effect())
        if not ran:
            # A rerun (the job was reclaimed after this or another executor ran it): the
            # store handed back the first result. Counted for the report.
            conn.execute(
                "INSERT INTO public.chaos_skipped (job_id, epoch) VALUES (%s, %s)", [job.id, epoch]
            )
    except (psycopg.Error, SubstrateError) as exc:
        _local.conn = None
        raise FailJob(
            f"effect store unreachable e{epoch}: {type(exc).__name__}", retry_in=0
        ) from None
    return {"epoch": epoch, "pid": os.getpid()}
