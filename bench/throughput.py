"""Throughput scenarios through the library, each next to its SQL ceiling.

(1) enqueue one by one and in bulk; (2) claim + complete one at a time with 1, 4 and 8
slots, blocking and asyncio; (3) batch claim (50) + complete; (5) the claim with a long
history of finished jobs versus an empty table.

Every figure is the median of `Sizes.runs` runs. Within a repetition the ceiling and the
library run back to back on the same backlog, so both see the same machine: the other
engineers' test runs on these 2 cores move absolute numbers, much less their ratio.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from substrate_db import AsyncSubstrate, Substrate

from . import ceiling
from .env import HISTORY_SCHEMA, KIND, MAIN_SCHEMA, Env, available, reset, top_up, vacuum
from .stats import Figure

LEASE_SECS = 300
MAX_BACKLOG = 800_000


@dataclass
class RunResult:
    """One timed run: jobs done, seconds, and the mean claim latency in ms if known."""

    jobs: int
    seconds: float
    claim_ms: float | None = None
    dry: bool = False

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


# -- the ceiling ------------------------------------------------------------------------


def ceiling_claim(env: Env, *, clients: int, batch: int, schema: str = MAIN_SCHEMA) -> RunResult:
    """pgbench running the library's claim and complete statements."""
    before = available(env, schema)
    result = ceiling.run_pgbench(
        env.pgbench,
        env.conninfo,
        ceiling.render_script("claim_complete", schema),
        clients=clients,
        seconds=env.sizes.seconds,
        variables={"kinds": "{" + KIND + "}", "batch": str(batch), "lease": str(LEASE_SECS)},
        workdir=env.workdir,
        tag=f"claim_complete_{schema}_{batch}",
    )
    after = available(env, schema)
    claim_ms = result.statement_ms[0] if result.statement_ms else None
    return RunResult(before - after, result.seconds, claim_ms, dry=after == 0)


def ceiling_enqueue(env: Env, *, batch: int) -> RunResult:
    """pgbench running the library's enqueue statement with `batch` jobs per statement."""
    n = batch
    variables = {
        "kinds": ceiling.pg_array([KIND] * n),
        "payloads": ceiling.pg_array(['{"n":1}'] * n),
        "priorities": ceiling.pg_array(["0"] * n),
        "run_ats": ceiling.pg_array([None] * n),
        "max_attempts": ceiling.pg_array(["5"] * n),
        "dedupe_keys": ceiling.pg_array([None] * n),
        "source_ids": ceiling.pg_array([None] * n),
        "serial_keys": ceiling.pg_array([None] * n),
    }
    result = ceiling.run_pgbench(
        env.pgbench,
        env.conninfo,
        ceiling.render_script("enqueue", MAIN_SCHEMA),
        clients=1,
        seconds=env.sizes.enqueue_seconds,
        variables=variables,
        workdir=env.workdir,
        tag=f"enqueue_{batch}",
    )
    return RunResult(result.transactions * batch, result.seconds)


# -- the library, blocking ----------------------------------------------------------------


def _sync_slots(
    client: Substrate, slots: int, seconds: float, step: Callable[[Substrate, str], tuple[int, int]]
) -> RunResult:
    """Run `step` in `slots` threads for `seconds`; step returns (jobs done, claim ns)."""
    stop = threading.Event()
    done = [0] * slots
    claim_ns = [0] * slots
    claims = [0] * slots
    dry = [False] * slots
    start = threading.Barrier(slots + 1)

    def slot(i: int) -> None:
        slot_id = f"bench-{i}"
        start.wait()
        while not stop.is_set():
            jobs, ns = step(client, slot_id)
            claim_ns[i] += ns
            claims[i] += 1
            if jobs == 0:
                dry[i] = True
                return
            done[i] += jobs

    threads = [threading.Thread(target=slot, args=(i,), daemon=True) for i in range(slots)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    total_claims = sum(claims)
    claim_ms = sum(claim_ns) / total_claims / 1e6 if total_claims else None
    return RunResult(sum(done), elapsed, claim_ms, dry=any(dry))


def _one_at_a_time(client: Substrate, slot_id: str) -> tuple[int, int]:
    t0 = time.perf_counter_ns()
    job = client.claim_next_job(slot_id, [KIND], LEASE_SECS)
    ns = time.perf_counter_ns() - t0
    if job is None:
        return 0, ns
    client.complete_job(job.id, job.claim_epoch)
    return 1, ns


def _batch_of(limit: int) -> Callable[[Substrate, str], tuple[int, int]]:
    def step(client: Substrate, slot_id: str) -> tuple[int, int]:
        t0 = time.perf_counter_ns()
        jobs = client.claim_jobs(slot_id, [KIND], limit, LEASE_SECS)
        ns = time.perf_counter_ns() - t0
        if jobs:
            client.complete_jobs([(j.id, j.claim_epoch, None) for j in jobs])
        return len(jobs), ns

    return step


def library_claim_sync(
    env: Env, *, slots: int, batch: int, schema: str = MAIN_SCHEMA, warm: bool = True
) -> RunResult:
    """Claim + complete through `Substrate`, `slots` threads sharing one pool."""
    step = _one_at_a_time if batch == 1 else _batch_of(batch)
    with env.client(schema, min_size=slots, max_size=slots) as client:
        client.pool.wait()
        if warm:
            # Past psycopg's prepare threshold on every pooled connection.
            _sync_slots(client, slots, env.sizes.warmup, step)
        return _sync_slots(client, slots, env.sizes.seconds, step)


# -- the library, asyncio -----------------------------------------------------------------


async def _async_slots(client: AsyncSubstrate, slots: int, seconds: float, batch: int) -> RunResult:
    stop = asyncio.Event()
    done = [0] * slots
    claim_ns = [0] * slots
    claims = [0] * slots
    dry = [False] * slots

    async def slot(i: int) -> None:
        slot_id = f"bench-{i}"
        while not stop.is_set():
            t0 = time.perf_counter_ns()
            if batch == 1:
                job = await client.claim_next_job(slot_id, [KIND], LEASE_SECS)
                claim_ns[i] += time.perf_counter_ns() - t0
                claims[i] += 1
                if job is None:
                    dry[i] = True
                    return
                await client.complete_job(job.id, job.claim_epoch)
                done[i] += 1
            else:
                jobs = await client.claim_jobs(slot_id, [KIND], batch, LEASE_SECS)
                claim_ns[i] += time.perf_counter_ns() - t0
                claims[i] += 1
                if not jobs:
                    dry[i] = True
                    return
                await client.complete_jobs([(j.id, j.claim_epoch, None) for j in jobs])
                done[i] += len(jobs)

    began = time.perf_counter()
    tasks = [asyncio.create_task(slot(i)) for i in range(slots)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    total = sum(claims)
    return RunResult(
        sum(done), elapsed, sum(claim_ns) / total / 1e6 if total else None, dry=any(dry)
    )


def library_claim_async(
    env: Env, *, slots: int, batch: int, schema: str = MAIN_SCHEMA
) -> RunResult:
    """Claim + complete through `AsyncSubstrate`, `slots` tasks sharing one pool."""

    async def main() -> RunResult:
        client = await AsyncSubstrate.connect(
            env.conninfo, schema=schema, min_size=slots, max_size=slots
        )
        try:
            await client.pool.wait()
            await _async_slots(client, slots, env.sizes.warmup, batch)
            return await _async_slots(client, slots, env.sizes.seconds, batch)
        finally:
            await client.close()

    return asyncio.run(main())


# -- enqueue ------------------------------------------------------------------------------


def library_enqueue(env: Env, *, batch: int) -> RunResult:
    """One thread enqueuing for `seconds`: `enqueue` when batch is 1, else `enqueue_many`."""
    with env.client(min_size=1, max_size=1) as client:
        client.pool.wait()
        jobs = [{"kind": KIND, "payload": {"n": i}} for i in range(batch)]

        def once() -> int:
            if batch == 1:
                client.enqueue(KIND, {"n": 1})
                return 1
            return len(client.enqueue_many(jobs))

        for _ in range(10):  # past the prepare threshold
            once()
        done = 0
        began = time.perf_counter()
        deadline = began + env.sizes.enqueue_seconds
        while time.perf_counter() < deadline:
            done += once()
        return RunResult(done, time.perf_counter() - began)


# -- scenarios ------------------------------------------------------------------------------


@dataclass
class Measured:
    """Figures of one scenario, by key."""

    figures: dict[str, Figure]
    notes: list[str]


def _record(fig: Figure, run: RunResult, notes: list[str]) -> None:
    fig.add(run.rate)
    if run.dry:
        notes.append(f"{fig.name}: the backlog ran dry in a run; raise Sizes.backlog")


def scenario_enqueue(env: Env) -> Measured:
    """(1) enqueue one by one, and in bulk (enqueue_many of `enqueue_batch` jobs)."""
    bulk = env.sizes.enqueue_batch
    figs = {
        "one_lib": Figure("enqueue one by one (library)", "jobs/s"),
        "one_sql": Figure("enqueue one by one (SQL ceiling)", "jobs/s"),
        "bulk_lib": Figure(f"enqueue_many x{bulk} (library)", "jobs/s"),
        "bulk_sql": Figure(f"enqueue x{bulk} (SQL ceiling)", "jobs/s"),
    }
    notes: list[str] = []
    for rep in range(env.sizes.runs):
        env.say(f"(1) enqueue, run {rep + 1}/{env.sizes.runs}")
        runs: list[tuple[str, Callable[[], RunResult]]] = [
            ("one_sql", partial(ceiling_enqueue, env, batch=1)),
            ("one_lib", partial(library_enqueue, env, batch=1)),
            ("bulk_sql", partial(ceiling_enqueue, env, batch=bulk)),
            ("bulk_lib", partial(library_enqueue, env, batch=bulk)),
        ]
        for key, run in runs:
            reset(env)
            _record(figs[key], run(), notes)
    reset(env)
    return Measured(figs, notes)


def scenario_claims(env: Env) -> Measured:
    """(2) one at a time with 1, 4, 8 slots, sync and async; (3) batch claim of 50."""
    figs: dict[str, Figure] = {}
    notes: list[str] = []
    configs: list[tuple[str, int, int]] = [
        ("one", 1, 1),
        ("one", 4, 1),
        ("one", 8, 1),
        ("batch", 1, 50),
        ("batch", 4, 50),
    ]
    for _, slots, batch in configs:
        label = "one at a time" if batch == 1 else f"batch {batch}"
        plural = "s" if slots > 1 else ""
        figs[f"sql_{slots}_{batch}"] = Figure(
            f"claim+complete {label}, {slots} client{plural} (SQL)", "jobs/s"
        )
        figs[f"sync_{slots}_{batch}"] = Figure(
            f"claim+complete {label}, {slots} slot{plural} sync", "jobs/s"
        )
        if batch == 1:
            figs[f"async_{slots}_{batch}"] = Figure(
                f"claim+complete {label}, {slots} slot{plural} async", "jobs/s"
            )
    reset(env)
    backlog = calibrate_backlog(env, clients=4, batch=50)
    env.say(f"(2, 3) claim scenarios: backlog held at {backlog:,} available jobs")
    for rep in range(env.sizes.runs):
        env.say(f"(2, 3) claim + complete, run {rep + 1}/{env.sizes.runs}")
        for _, slots, batch in configs:
            runs: list[tuple[str, Callable[[], RunResult]]] = [
                (f"sql_{slots}_{batch}", partial(ceiling_claim, env, clients=slots, batch=batch)),
                (
                    f"sync_{slots}_{batch}",
                    partial(library_claim_sync, env, slots=slots, batch=batch),
                ),
            ]
            if f"async_{slots}_{batch}" in figs:
                runs.append(
                    (
                        f"async_{slots}_{batch}",
                        partial(library_claim_async, env, slots=slots, batch=batch),
                    )
                )
            for key, run in runs:
                # Every run starts from the same queue: as deep, and vacuumed as
                # autovacuum keeps it, not carrying the previous run's dead tuples.
                top_up(env, backlog)
                vacuum(env)
                _record(figs[key], run(), notes)
    reset(env)
    return Measured(figs, notes)


def calibrate_backlog(env: Env, *, clients: int, batch: int, schema: str = MAIN_SCHEMA) -> int:
    """A backlog that the fastest run of a scenario cannot eat more than a third of, so
    every run sees a queue of about the same depth (the claim's cost must not depend on
    it, but if it does, every run pays the same)."""
    probe_backlog = env.sizes.backlog * 4
    while True:
        top_up(env, probe_backlog, schema)
        vacuum(env, schema)
        probe = ceiling_claim(env, clients=clients, batch=batch, schema=schema)
        if not probe.dry or probe_backlog >= MAX_BACKLOG:
            break
        # A probe that emptied the queue under-measures the rate: again, deeper.
        probe_backlog = min(probe_backlog * 4, MAX_BACKLOG)
    need = int(probe.rate * env.sizes.seconds * 3)
    return max(env.sizes.backlog, min(need, MAX_BACKLOG))


def fill_history(env: Env, rows: int) -> float:
    """`rows` finished jobs in the history schema (vacuumed, as autovacuum would leave
    them); returns the seconds it took."""
    began = time.perf_counter()
    with env.client(HISTORY_SCHEMA, min_size=1, max_size=1) as client:
        client.migrate()
    reset(env, HISTORY_SCHEMA)
    with env.admin() as conn:
        conn.execute(
            f'INSERT INTO "{HISTORY_SCHEMA}".jobs '
            "(kind, payload, state, attempts, claim_epoch, claimed_by, result, "
            " created_at, updated_at, finished_at) "
            "SELECT %s, jsonb_build_object('n', g), 'completed', 1, 1, 'history', '{}', "
            "       now() - interval '1 day', now() - interval '1 day', now() - interval '1 day' "
            "FROM generate_series(1, %s) g",
            [KIND, rows],
        )
        conn.execute(f'VACUUM (ANALYZE) "{HISTORY_SCHEMA}".jobs')
    return time.perf_counter() - began


def scenario_history(env: Env) -> Measured:
    """(5) claim + complete one at a time at 4 slots, empty table versus a table holding
    `Sizes.history` finished jobs; the same backlog of available jobs in both."""
    figs = {
        "empty_sql": Figure("claim (SQL), empty history", "ms/claim", higher_is_better=False),
        "hist_sql": Figure("claim (SQL), with history", "ms/claim", higher_is_better=False),
        "empty_lib": Figure("claim+complete 4 slots sync, empty history", "jobs/s"),
        "hist_lib": Figure("claim+complete 4 slots sync, with history", "jobs/s"),
    }
    notes: list[str] = []
    env.say(f"(5) writing {env.sizes.history:,} finished jobs")
    secs = fill_history(env, env.sizes.history)
    env.say(f"(5) history written in {secs:.1f} s")
    reset(env)
    backlog = env.sizes.backlog
    for rep in range(env.sizes.runs):
        env.say(f"(5) history, run {rep + 1}/{env.sizes.runs}")
        for prefix, schema in (("empty", MAIN_SCHEMA), ("hist", HISTORY_SCHEMA)):
            top_up(env, backlog, schema)
            vacuum(env, schema)
            run = ceiling_claim(env, clients=4, batch=1, schema=schema)
            figs[f"{prefix}_sql"].add(run.claim_ms or float("nan"))
            top_up(env, backlog, schema)
            vacuum(env, schema)
            _record(
                figs[f"{prefix}_lib"],
                library_claim_sync(env, slots=4, batch=1, schema=schema),
                notes,
            )
    reset(env)
    return Measured(figs, notes)
