"""Procrastinate draining a backlog with a no-op task; run in `.bench-venv` by the harness.

Usage: peer_procrastinate.py CONNINFO JOBS CONCURRENCY

Its best setting here: the async psycopg connector, an async no-op task, `concurrency`
jobs in flight in one worker, LISTEN/NOTIFY wake-ups (its default), jobs kept after
success (its default; deleting them costs a statement more). The harness polls
`procrastinate_jobs` for jobs still `todo` or `doing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import procrastinate
import psycopg
from peer_protocol import serve

QUEUE = "bench"
WARMUP_ROUNDS = 6


async def main(dsn: str, jobs: int, concurrency: int) -> None:
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop", queue=QUEUE)
    async def noop() -> None:
        return None

    admin = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    state: dict[str, asyncio.Task[None]] = {}

    async def pending() -> int:
        cur = await admin.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async with app.open_async():
        cur = await admin.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        row = await cur.fetchone()
        if not (row and row[0]):
            await app.schema_manager.apply_schema_async()

        async def start() -> None:
            state["task"] = asyncio.create_task(
                app.run_worker_async(
                    queues=[QUEUE],
                    concurrency=concurrency,
                    wait=True,
                    install_signal_handlers=False,
                    listen_notify=True,
                )
            )
            for _ in range(WARMUP_ROUNDS):
                await noop.defer_async()
                while await pending():  # noqa: ASYNC110 - polls the database
                    await asyncio.sleep(0.01)

        async def enqueue() -> None:
            await noop.batch_defer_async(*[{} for _ in range(jobs)])

        async def stop_and_reset() -> None:
            task = state["task"]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await admin.execute("TRUNCATE procrastinate_jobs CASCADE")

        await serve(start, enqueue, stop_and_reset)
    await admin.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
