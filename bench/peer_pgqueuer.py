"""PgQueuer draining a backlog with a no-op entrypoint; run in `.bench-venv` by the harness.

Usage: peer_pgqueuer.py CONNINFO JOBS BATCH_SIZE

Its best setting here: the asyncpg driver (PgQueuer's fastest), one QueueManager, an
async no-op entrypoint, `batch_size` jobs per dequeue, durable tables (its default), and
LISTEN/NOTIFY wake-ups (its default). Completed jobs leave the `pgqueuer` table (moved to
`pgqueuer_log` by its buffered status writer), so the harness polls that table.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta

import asyncpg
from peer_protocol import serve
from pgqueuer import Queries, QueueManager
from pgqueuer.models import Job

ENTRYPOINT = "bench"
WARMUP_ROUNDS = 6


async def main(dsn: str, jobs: int, batch_size: int) -> None:
    admin = await asyncpg.connect(dsn)
    queries = Queries.from_asyncpg_connection(admin)
    if not await queries.schema_is_installed():
        await queries.install()
    state: dict[str, object] = {}

    async def start() -> None:
        conn = await asyncpg.connect(dsn)
        qm = QueueManager(Queries.from_asyncpg_connection(conn))

        @qm.entrypoint(ENTRYPOINT)
        async def noop(job: Job) -> None:
            return None

        task = asyncio.create_task(
            qm.run(batch_size=batch_size, dequeue_timeout=timedelta(seconds=1))
        )
        state.update(conn=conn, qm=qm, task=task)
        # Warm up: connections open, statements prepared, the loop in its steady state.
        for _ in range(WARMUP_ROUNDS):
            await queries.enqueue(ENTRYPOINT, None)
            while await admin.fetchval("SELECT count(*) FROM pgqueuer"):  # noqa: ASYNC110 - polls the database
                await asyncio.sleep(0.01)

    async def enqueue() -> None:
        await queries.enqueue([ENTRYPOINT] * jobs, [None] * jobs, [0] * jobs)

    async def stop_and_reset() -> None:
        qm: QueueManager = state["qm"]  # type: ignore[assignment]
        qm.shutdown.set()
        await state["task"]  # type: ignore[misc]
        await state["conn"].close()  # type: ignore[attr-defined]
        await admin.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")

    await serve(start, enqueue, stop_and_reset)
    await admin.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
