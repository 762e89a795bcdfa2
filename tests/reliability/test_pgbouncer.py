"""Everything works through PgBouncer in transaction pooling mode (Debian's 1.18).

In transaction mode each transaction may run on a different server connection, so the
library must hold nothing across transactions: no server-side prepared statements
(`pgbouncer=True` turns psycopg's off), no session advisory locks (recovery and
migrations use transaction-scoped ones), no LISTEN (workers and `wait_for_result`
poll). These tests run the lifecycle (sync and async), migrations, concurrent clients,
lease recovery's lock, the ready worker and the CLI through PgBouncer, and show on a
one-connection PgBouncer why `pgbouncer=True` is needed at all.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from substrate_db import AsyncSubstrate, DatabaseError, JobState, Substrate
from substrate_db.cli import cli
from substrate_db.worker import WorkerOptions, run_worker

from ._pgbouncer import PgBouncer
from .handlers import echo

FAR = datetime.now(UTC) + timedelta(days=1)


def test_lifecycle_through_pgbouncer(pgbouncer_dsn: str) -> None:
    with Substrate.connect(pgbouncer_dsn, pgbouncer=True, max_size=4) as client:
        ids = client.enqueue_many(
            [{"kind": "k", "payload": {"n": i}, "source_id": "src"} for i in range(12)]
        )
        # More executions of each query than psycopg's prepare threshold (5): with
        # prepared statements on, they would be prepared on one server connection and
        # missing on the next.
        done = []
        for _ in range(6):
            for job in client.claim_jobs("slot", ["k"], 2, lease_secs=30):
                assert client.extend_lease(job.id, job.claim_epoch, 60).ok
                assert client.complete_job(job.id, job.claim_epoch, {"n": job.payload["n"]}).ok
                done.append(job.id)
        assert sorted(done) == ids
        assert len(client.fetch_results("src", limit=100)) == 12
        outcome = client.wait_for_result(ids[0], source_id="src", timeout=5, poll_secs=0.05)
        assert outcome is not None and outcome.state == JobState.COMPLETED

        retry_id = client.enqueue("k", max_attempts=2)
        job = client.claim_next_job("slot", ["k"], lease_secs=1)
        assert job is not None and job.id == retry_id
        assert client.fail_job(job.id, job.claim_epoch, "boom", retry_in=0).ok
        job = client.claim_next_job("slot", ["k"], lease_secs=1)
        assert job is not None and job.claim_epoch == 2
        recovered = client.release_expired_leases_exclusive(now=FAR)
        assert recovered is not None and recovered.failed_ids == (retry_id,)
        assert client.cancel_job(client.enqueue("k"))
        assert client.migrate() == []  # already migrated: a no-op, through PgBouncer


def test_migrate_through_pgbouncer(pgbouncer: PgBouncer, substrate_postgres: Any) -> None:
    name = "pgb_migrate_fresh"
    substrate_postgres.create_database(name)
    try:
        dsn = pgbouncer.conninfo_for(name)
        with Substrate.connect(dsn, pgbouncer=True, max_size=2) as client:
            assert client.migrate()
            assert client.migrate() == []
            assert all(m.applied_at is not None for m in client.migration_status())
    finally:
        substrate_postgres.drop_database(name)


async def test_async_lifecycle_through_pgbouncer(pgbouncer_dsn: str) -> None:
    async with await AsyncSubstrate.connect(pgbouncer_dsn, pgbouncer=True, max_size=4) as client:
        ids = await client.enqueue_many([{"kind": "k", "source_id": "a"} for _ in range(20)])

        async def slot(n: int) -> list[int]:
            got = []
            while jobs := await client.claim_jobs(f"slot-{n}", ["k"], 3, lease_secs=30):
                for r in await client.complete_jobs([(j.id, j.claim_epoch, n) for j in jobs]):
                    assert r.ok
                got += [j.id for j in jobs]
            return got

        per_slot = await asyncio.gather(*(slot(n) for n in range(4)))
        assert sorted(i for ids_ in per_slot for i in ids_) == ids
        outcome = await client.wait_for_result(ids[-1], source_id="a", timeout=5, poll_secs=0.05)
        assert outcome is not None


def test_concurrent_clients_share_few_server_connections(
    pgbouncer: PgBouncer, substrate_dsn: str
) -> None:
    """Eight clients, each with its own pool, through a PgBouncer whose server pool is
    smaller than the number of clients: each job is claimed once, and no client trips
    over another's statements."""
    tiny = PgBouncer(substrate_dsn, pool_size=2).start()
    try:
        dsn = tiny.through(substrate_dsn)
        with Substrate.connect(dsn, pgbouncer=True) as setup:
            setup.enqueue_many([{"kind": "c"} for _ in range(400)])
        start = threading.Barrier(8)
        claims: list[list[int]] = [[] for _ in range(8)]
        errors: list[BaseException] = []

        def slot(n: int) -> None:
            try:
                with Substrate.connect(dsn, pgbouncer=True, max_size=2) as client:
                    start.wait()
                    while jobs := client.claim_jobs(f"s{n}", ["c"], 5, lease_secs=60):
                        results = client.complete_jobs([(j.id, j.claim_epoch, None) for j in jobs])
                        assert all(r.ok for r in results)
                        claims[n] += [j.id for j in jobs]
            except BaseException as exc:  # surfaced below, with the thread's own error
                errors.append(exc)

        threads = [threading.Thread(target=slot, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        counts = Counter(i for c in claims for i in c)
        assert len(counts) == 400 and set(counts.values()) == {1}
    finally:
        tiny.stop()


def test_without_the_option_clients_collide_on_prepared_statements(
    pgbouncer: PgBouncer, substrate_dsn: str
) -> None:
    """The fact behind `pgbouncer=True`: psycopg prepares a query after 5 executions as
    `_pg3_0`; on a PgBouncer with one server connection, a second client preparing its
    own `_pg3_0` there fails. (If this ever passes without error, PgBouncer gained
    prepared-statement support, 1.21+, and the option may become unnecessary.)"""
    one = PgBouncer(substrate_dsn, pool_size=1).start()
    try:
        dsn = one.through(substrate_dsn)
        with (
            Substrate.connect(dsn, max_size=1) as a,
            Substrate.connect(dsn, max_size=1) as b,
            pytest.raises(DatabaseError) as caught,
        ):
            for _ in range(10):
                a.get_job(1)
                b.list_jobs(limit=1)
        assert caught.value.sqlstate in {"42P05", "26000"}  # already exists / does not exist
    finally:
        one.stop()


def test_recovery_lock_is_transaction_scoped_through_pgbouncer(pgbouncer_dsn: str) -> None:
    """Two recovery owners through PgBouncer: while one holds the lock (inside its
    transaction), the other stands by; once that transaction ends, it works."""
    with Substrate.connect(pgbouncer_dsn, pgbouncer=True, max_size=2) as client:
        client.enqueue("k")
        assert client.claim_next_job("slot", ["k"], lease_secs=1) is not None
        with psycopg.connect(pgbouncer_dsn, prepare_threshold=None) as holder:
            with holder.transaction():
                got = holder.execute(
                    "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
                    ["substrate-recovery:substrate"],
                ).fetchone()
                assert got == (True,)
                assert client.release_expired_leases_exclusive(now=FAR) is None
            result = client.release_expired_leases_exclusive(now=FAR)
            assert result is not None and result.requeued == 1


def test_worker_through_pgbouncer_polls_and_drains(pgbouncer_dsn: str) -> None:
    with Substrate.connect(pgbouncer_dsn, pgbouncer=True) as client:
        ids = client.enqueue_many([{"kind": "w", "payload": {"i": i}} for i in range(50)])
    seen: list[bool] = []
    stats = run_worker(
        pgbouncer_dsn,
        echo,
        WorkerOptions(kinds=["w"], concurrency=4, batch_size=7, burst=True, lease_secs=30),
        pgbouncer=True,
        on_ready=lambda w: seen.append(w.options.listen),
    )
    assert seen == [False]  # no LISTEN behind PgBouncer
    assert (stats.claimed, stats.completed, stats.stale) == (50, 50, 0)
    with Substrate.connect(pgbouncer_dsn, pgbouncer=True) as client:
        for job_id in ids:
            job = client.get_job(job_id)
            assert job is not None and job.state == JobState.COMPLETED


def test_cli_through_pgbouncer(pgbouncer_dsn: str) -> None:
    runner = CliRunner()

    def run(*args: str) -> Any:
        result = runner.invoke(cli, ["--dsn", pgbouncer_dsn, "--pgbouncer", *args])
        assert result.exit_code == 0, (args, result.output, result.stderr)
        return json.loads(result.stdout) if "--json" in args else result.stdout

    run("migrate")
    ids = [
        run("enqueue", "cli", "--payload", json.dumps({"i": i}), "--json")["id"] for i in range(8)
    ]
    assert sorted(j["id"] for j in run("jobs", "list", "--kind", "cli", "--json")) == sorted(ids)
    run("worker", "--kinds", "cli", "--handler", "reliability.handlers:echo", "--burst", "--json")
    stats = run("stats", "--json")
    assert json.dumps(stats)  # one JSON document
    assert run("jobs", "show", str(ids[0]), "--json")["state"] == "completed"
    assert run("recover-leases", "--json")["standing_by"] is False


def test_intake_through_pgbouncer(pgbouncer_dsn: str, tmp_path: Any) -> None:
    intake = pytest.importorskip("substrate_db.intake", reason="the intake adapter (issue 3)")
    if not hasattr(intake, "SubstrateIntake"):
        pytest.skip("substrate_db.intake.SubstrateIntake is not there yet (issue 3)")
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(pgbouncer_dsn)
    with Substrate.connect(pgbouncer_dsn, pgbouncer=True) as client:
        job_id = client.enqueue("intake.k", {"subject": "hello"})
    config = intake.SubstrateConfig(
        enabled=True,
        credential="none",
        kinds=["intake.k"],
        slot_id="slot-pgb",
        host=parts["host"],
        port=int(parts["port"]),
        database=parts["dbname"],
        user=parts["user"],
        pgbouncer=True,
        is_lease_recovery_owner=True,
    )
    queue = intake.SQLiteTaskQueue(tmp_path / "local.db")
    with intake.SubstrateIntake(
        config, queue, resolve_credential=lambda _: "unused-with-trust"
    ) as adapter:
        tick = adapter.tick()
        assert tick.claimed and tick.job_id == job_id, tick
        task = queue.get_task(tick.local_task_id)
        assert task is not None
        adapter.write_back(task, ok=True, result={"done": True})
        adapter.lease_recovery_tick()
    with Substrate.connect(pgbouncer_dsn, pgbouncer=True) as client:
        job = client.get_job(job_id)
        assert job is not None and job.state == JobState.COMPLETED
