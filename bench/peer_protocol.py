"""The line protocol between the harness and a consumer process it times.

Runs in the peers' own venv (`.bench-venv`, no substrate_db there), so it uses the
standard library only. The consumer process:

1. starts its worker, warms it up, prints `ready`;
2. on `go`, enqueues the backlog in bulk and prints `enqueued` once it is committed
   (the harness starts its clock there and polls the database until the queue is empty);
3. on `done`, stops its worker, empties its tables, and starts again at 1;
4. on `quit` (or end of input), stops and exits.

The harness, not the consumer, decides when the queue is drained: every system is timed
the same way, by the same poll, from outside its process.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable


def say(word: str) -> None:
    print(word, flush=True)


async def read_line() -> str:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip() or "quit"


async def serve(
    start: Callable[[], Awaitable[None]],
    enqueue: Callable[[], Awaitable[None]],
    stop_and_reset: Callable[[], Awaitable[None]],
) -> None:
    """Drive one consumer through as many runs as the harness asks for."""
    while True:
        await start()
        say("ready")
        command = await read_line()
        if command != "go":
            await stop_and_reset()
            return
        await enqueue()
        say("enqueued")
        command = await read_line()
        await stop_and_reset()
        if command != "done":
            return
