"""The idempotency store: an effect applied once per key, across real concurrent
connections, inside the caller's transaction."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from substrate_db import Substrate
from substrate_db.errors import InvalidArgument
from substrate_db.intake import (
    AsyncIdempotencyStore,
    IdempotencyStore,
    LocalTask,
    job_effect_key,
)

store = IdempotencyStore()


@pytest.fixture
def effects_table(substrate_dsn: str) -> str:
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE effects (key text, by text)")
    return substrate_dsn


def effect_rows(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT key, by FROM effects ORDER BY by").fetchall()


def wait_for_lock_waiter(dsn: str) -> None:
    """Block until some session of this database waits on a lock (the second run's insert)."""
    deadline = time.monotonic() + 20
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            if row is not None and row[0] > 0:
                return
            time.sleep(0.01)
    raise AssertionError("the second execution never waited on the first one's key")


def test_the_effect_runs_once_per_key(effects_table: str) -> None:
    calls: list[str] = []
    with psycopg.connect(effects_table, autocommit=True) as conn:

        def effect(by: str) -> Any:
            calls.append(by)
            conn.execute("INSERT INTO effects VALUES ('k', %s)", [by])
            return {"receipt": by, "items": (1, 2)}

        first = store.run_once(conn, "substrate-1-e1", lambda: effect("first"))
        second = store.run_once(conn, "substrate-1-e1", lambda: effect("second"))

        assert first == second == {"receipt": "first", "items": [1, 2]}
        assert calls == ["first"]
        record = store.get(conn, "substrate-1-e1")
        assert record is not None and record.result == first
        assert store.get(conn, "other") is None
    assert effect_rows(effects_table) == [("k", "first")]


def test_a_failed_effect_leaves_no_key(effects_table: str) -> None:
    with psycopg.connect(effects_table, autocommit=True) as conn:

        def failing() -> Any:
            conn.execute("INSERT INTO effects VALUES ('k', 'failed')")
            raise RuntimeError("payment provider down")

        with pytest.raises(RuntimeError):
            store.run_once(conn, "key-1", failing)
        assert store.get(conn, "key-1") is None
        assert store.run_once(conn, "key-1", lambda: "second try") == "second try"
    assert effect_rows(effects_table) == []


def test_inside_the_callers_transaction(effects_table: str) -> None:
    with psycopg.connect(effects_table, autocommit=True) as conn:
        with pytest.raises(LookupError), conn.transaction():
            store.run_once(conn, "key-2", lambda: "done")
            raise LookupError("the caller's own work failed afterwards")
        assert store.get(conn, "key-2") is None  # rolled back with the caller
        with conn.transaction():
            store.run_once(conn, "key-2", lambda: "done")
        record = store.get(conn, "key-2")
        assert record is not None and record.result == "done"


def test_null_result_is_a_stored_result(substrate_dsn: str) -> None:
    calls = []
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        assert store.run_once(conn, "k", lambda: calls.append(1)) is None
        assert store.run_once(conn, "k", lambda: calls.append(2)) is None
    assert calls == [1]


def test_two_concurrent_executions_apply_the_effect_once(effects_table: str) -> None:
    first_inside = threading.Event()
    release = threading.Event()
    results: dict[str, Any] = {}
    calls: list[str] = []

    def run(name: str, hold: bool) -> None:
        with psycopg.connect(effects_table, autocommit=True) as conn:

            def effect() -> Any:
                calls.append(name)
                conn.execute("INSERT INTO effects VALUES ('k', %s)", [name])
                if hold:
                    first_inside.set()
                    assert release.wait(20)
                return {"by": name}

            results[name] = store.run_once(conn, "substrate-9-charge", effect)

    a = threading.Thread(target=run, args=("a", True))
    a.start()
    assert first_inside.wait(20)
    b = threading.Thread(target=run, args=("b", False))
    b.start()
    wait_for_lock_waiter(effects_table)  # b is blocked on a's uncommitted key
    release.set()
    a.join(20)
    b.join(20)

    assert calls == ["a"]
    assert results == {"a": {"by": "a"}, "b": {"by": "a"}}
    assert effect_rows(effects_table) == [("k", "a")]


def test_the_waiter_runs_the_effect_when_the_first_rolls_back(effects_table: str) -> None:
    first_inside = threading.Event()
    release = threading.Event()
    results: dict[str, Any] = {}

    def first() -> None:
        with psycopg.connect(effects_table, autocommit=True) as conn:

            def effect() -> Any:
                conn.execute("INSERT INTO effects VALUES ('k', 'a')")
                first_inside.set()
                assert release.wait(20)
                raise RuntimeError("crashed mid-effect")

            with pytest.raises(RuntimeError):
                store.run_once(conn, "key", effect)

    def second() -> None:
        with psycopg.connect(effects_table, autocommit=True) as conn:

            def effect() -> Any:
                conn.execute("INSERT INTO effects VALUES ('k', 'b')")
                return "b did it"

            results["b"] = store.run_once(conn, "key", effect)

    a = threading.Thread(target=first)
    a.start()
    assert first_inside.wait(20)
    b = threading.Thread(target=second)
    b.start()
    wait_for_lock_waiter(effects_table)
    release.set()
    a.join(20)
    b.join(20)
    assert results == {"b": "b did it"}
    assert effect_rows(effects_table) == [("k", "b")]


def test_job_effect_key_is_stable_across_claims(substrate: Substrate, substrate_dsn: str) -> None:
    job_id = substrate.enqueue("charge", {})
    first = substrate.claim_next_job("slot-a", ["charge"], lease_secs=60)
    assert first is not None
    later = first.lease_expires_at + timedelta(seconds=1)
    substrate.release_expired_leases(now=later)
    second = substrate.claim_next_job("slot-b", ["charge"], now=later)
    assert second is not None and second.claim_epoch == 2
    # The per-claim keys differ; the per-job effect key does not.
    assert first.idempotency_key != second.idempotency_key
    assert job_effect_key(first, "charge") == job_effect_key(second, "charge")
    assert job_effect_key(first, "charge") == f"substrate-{job_id}-charge"
    task = LocalTask(
        subject="s",
        source=f"substrate:{job_id}",
        payload={"_substrate_job_id": job_id, "_substrate_claim_epoch": 2},
    )
    assert job_effect_key(task, "charge") == job_effect_key(job_id, "charge")

    charges: list[int] = []
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        for claimed in (first, second):  # the stale executor and the new one
            effect = functools.partial(charges.append, claimed.claim_epoch)
            store.run_once(conn, job_effect_key(claimed, "charge"), effect)
    assert charges == [1]


def test_bad_input_is_refused_before_the_database(substrate_dsn: str) -> None:
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        with pytest.raises(InvalidArgument, match="expected key to be a non-empty string"):
            store.run_once(conn, "", lambda: 1)
        with pytest.raises(InvalidArgument, match="effect"):
            job_effect_key(1, "has space")
        with pytest.raises(InvalidArgument, match="before"):
            store.prune(conn, datetime(2020, 1, 1))  # naive
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_prune(substrate_dsn: str) -> None:
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        old = datetime.now(UTC) - timedelta(days=30)
        store.run_once(conn, "old-1", lambda: 1, now=old)
        store.run_once(conn, "old-2", lambda: 2, now=old)
        store.run_once(conn, "new", lambda: 3)
        cutoff = datetime.now(UTC) - timedelta(days=7)
        assert store.prune(conn, cutoff, limit=1) == 1
        assert store.prune(conn, cutoff) == 1
        assert store.prune(conn, cutoff) == 0
        assert store.get(conn, "new") is not None


async def test_async_store_concurrent_executions(substrate_dsn: str) -> None:
    astore = AsyncIdempotencyStore()
    inside = asyncio.Event()
    release = asyncio.Event()
    calls: list[str] = []

    async def run(name: str, hold: bool) -> Any:
        async with await psycopg.AsyncConnection.connect(substrate_dsn, autocommit=True) as conn:

            async def effect() -> Any:
                calls.append(name)
                if hold:
                    inside.set()
                    await release.wait()
                return {"by": name}

            return await astore.run_once(conn, "async-key", effect)

    first = asyncio.create_task(run("a", True))
    await asyncio.wait_for(inside.wait(), 20)
    second = asyncio.create_task(run("b", False))
    await asyncio.to_thread(wait_for_lock_waiter, substrate_dsn)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, second), 20)
    assert list(results) == [{"by": "a"}, {"by": "a"}]
    assert calls == ["a"]
    async with await psycopg.AsyncConnection.connect(substrate_dsn, autocommit=True) as conn:
        record = await astore.get(conn, "async-key")
        assert record is not None and record.result == {"by": "a"}
        assert await astore.prune(conn, datetime.now(UTC) + timedelta(seconds=1)) == 1
