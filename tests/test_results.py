"""Results back to the enqueuer: source-checked in SQL, delivered once, awaited."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest

from substrate_db import AsyncSubstrate, JobState, ResultTooLarge, Substrate, core
from substrate_db import results as results_mod
from substrate_db._queries import rendered_queries


def _run(substrate: Substrate, job_id: int, result: object = None) -> None:
    job = substrate.claim_next_job("w", [substrate.get_job(job_id).kind])  # type: ignore[union-attr]
    assert job is not None and job.id == job_id
    assert substrate.complete_job(job.id, job.claim_epoch, result).ok


def test_fetch_results_delivers_each_once_to_its_source(substrate: Substrate) -> None:
    mine = [substrate.enqueue("task", {"i": i}, source_id="ws-a") for i in range(3)]
    theirs = substrate.enqueue("task", source_id="ws-b")
    substrate.enqueue("task")  # no source: never delivered
    unfinished = substrate.enqueue("task", source_id="ws-a")
    for job_id in [*mine, theirs]:
        _run(substrate, job_id, {"done": job_id})
    got = substrate.fetch_results("ws-a")
    assert [o.job_id for o in got] == mine  # oldest first
    assert all(o.state == JobState.COMPLETED and o.source_id == "ws-a" for o in got)
    assert got[0].result == {"done": mine[0]} and got[0].delivered_at is not None
    assert substrate.fetch_results("ws-a") == []
    assert [o.job_id for o in substrate.fetch_results("ws-b")] == [theirs]
    assert unfinished not in {o.job_id for o in got}
    stored = substrate.get_job(mine[0])
    assert stored is not None and stored.source_id == "ws-a"


def test_failed_and_cancelled_outcomes_are_delivered(substrate: Substrate) -> None:
    failed = substrate.enqueue("task", source_id="s", max_attempts=1)
    cancelled = substrate.enqueue("other", source_id="s")
    job = substrate.claim_next_job("w", ["task"])
    assert job is not None
    substrate.fail_job(job.id, job.claim_epoch, "boom")
    substrate.cancel_job(cancelled)
    outcomes = {o.job_id: o for o in substrate.fetch_results("s")}
    assert outcomes[failed].state == JobState.FAILED and outcomes[failed].last_error == "boom"
    assert outcomes[cancelled].state == JobState.CANCELLED


def test_four_consumers_deliver_each_result_once(substrate: Substrate, substrate_dsn: str) -> None:
    ids = substrate.enqueue_many([{"kind": "t", "source_id": "ws"} for _ in range(1000)])
    while jobs := substrate.claim_jobs("w", ["t"], 200):
        substrate.complete_jobs([(j.id, j.claim_epoch, j.id) for j in jobs])
    barrier = threading.Barrier(4)

    def consume(_: int) -> list[int]:
        with Substrate.connect(substrate_dsn, max_size=1) as client:
            barrier.wait()
            got: list[int] = []
            while batch := client.fetch_results("ws", limit=25):
                got += [o.job_id for o in batch]
            return got

    with ThreadPoolExecutor(4) as pool:
        seen = Counter(i for got in pool.map(consume, range(4)) for i in got)
    assert sorted(seen) == sorted(ids) and set(seen.values()) == {1}


def test_get_result_of_another_source_is_none_and_logged(
    substrate: Substrate, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = substrate.enqueue("t", source_id="owner")
    _run(substrate, job_id, "secret result")
    with caplog.at_level(logging.WARNING, logger="substrate_db"):
        assert substrate.get_result(job_id, source_id="intruder") is None
    assert f"[substrate] result-source-mismatch jobs.id={job_id} source=intruder" in caplog.text
    assert "secret" not in caplog.text
    assert substrate.get_result(999_999, source_id="owner") is None
    outcome = substrate.get_result(job_id, source_id="owner")
    assert outcome is not None and outcome.result == "secret result"
    assert substrate.fetch_results("intruder") == []
    assert substrate.wait_for_result(job_id, source_id="intruder", timeout=5) is None


def test_wait_for_result_wakes_on_notify(substrate: Substrate) -> None:
    job_id = substrate.enqueue("t", source_id="me")
    finished_at: list[float] = []

    def finish() -> None:
        time.sleep(0.3)
        _run(substrate, job_id, 42)
        finished_at.append(time.monotonic())

    t = threading.Thread(target=finish)
    t.start()
    # A long poll interval: only the notification can wake the waiter promptly.
    outcome = substrate.wait_for_result(job_id, source_id="me", timeout=30, poll_secs=20)
    woke = time.monotonic()
    t.join()
    assert outcome is not None and outcome.result == 42
    assert woke - finished_at[0] < 5  # not the 20 s poll: the notification woke it


def test_wait_for_result_polls_without_listen(substrate_dsn: str) -> None:
    with Substrate.connect(substrate_dsn, pgbouncer=True) as client:
        job_id = client.enqueue("t", source_id="me")
        threading.Timer(0.2, lambda: _run(client, job_id, "ok")).start()
        outcome = client.wait_for_result(job_id, source_id="me", timeout=30, poll_secs=0.05)
        assert outcome is not None and outcome.result == "ok"


def test_wait_for_result_times_out(substrate: Substrate) -> None:
    job_id = substrate.enqueue("t", source_id="me")
    with pytest.raises(TimeoutError, match=str(job_id)):
        substrate.wait_for_result(job_id, source_id="me", timeout=0.2, poll_secs=0.05)
    assert substrate.wait_for_result(123456, source_id="me", timeout=5) is None


async def test_wait_for_result_async(async_substrate: AsyncSubstrate, substrate_dsn: str) -> None:
    job_id = await async_substrate.enqueue("t", source_id="me")

    def finish() -> None:
        with Substrate.connect(substrate_dsn) as s:
            _run(s, job_id, {"async": True})

    threading.Timer(0.2, finish).start()
    outcome = await async_substrate.wait_for_result(
        job_id, source_id="me", timeout=30, poll_secs=20
    )
    assert outcome is not None and outcome.result == {"async": True}
    assert [o.job_id for o in await async_substrate.fetch_results("me")] == [job_id]


def test_oversized_result_fails_the_job(substrate_dsn: str) -> None:
    with Substrate.connect(substrate_dsn, max_result_bytes=1000) as client:
        job_id = client.enqueue("t", source_id="me")
        job = client.claim_next_job("w", ["t"])
        assert job is not None
        with pytest.raises(ResultTooLarge, match="result") as info:
            client.complete_job(job.id, job.claim_epoch, "x" * 2000)
        assert info.value.results[0].state == JobState.FAILED
        stored = client.get_job(job_id)
        assert stored is not None and stored.state == JobState.FAILED
        assert "result too large: 2002 bytes" in (stored.last_error or "")
        # Batches complete what fits and fail what does not.
        a, b = client.enqueue_many([{"kind": "u"}, {"kind": "u"}])
        jobs = {j.id: j for j in client.claim_jobs("w", ["u"], 2)}
        with pytest.raises(ResultTooLarge) as batch:
            client.complete_jobs(
                [(a, jobs[a].claim_epoch, "small"), (b, jobs[b].claim_epoch, "é" * 600)]
            )
        assert [r.state for r in batch.value.results] == [JobState.COMPLETED, JobState.FAILED]


def test_row_level_security_makes_source_an_identity(substrate_dsn: str) -> None:
    """source_id is a claim, not an authentication. With one database role per source
    and a policy, Postgres itself keeps each source to its own jobs."""
    with psycopg.connect(substrate_dsn, autocommit=True) as admin:
        for role in ("ws_alpha", "ws_beta"):
            admin.execute(f"DROP ROLE IF EXISTS {role}")
            admin.execute(f"CREATE ROLE {role} LOGIN")
            admin.execute(f"GRANT USAGE ON SCHEMA substrate TO {role}")
            admin.execute(
                f"GRANT SELECT, INSERT, UPDATE ON substrate.jobs, substrate.serial_keys TO {role}"
            )
            admin.execute(f"GRANT USAGE ON SEQUENCE substrate.jobs_id_seq TO {role}")
        admin.execute("ALTER TABLE substrate.jobs ENABLE ROW LEVEL SECURITY")
        admin.execute(
            "CREATE POLICY own_jobs ON substrate.jobs USING (source_id = current_user)"
            " WITH CHECK (source_id = current_user)"
        )
    try:
        dsn_alpha = psycopg.conninfo.make_conninfo(substrate_dsn, user="ws_alpha")
        dsn_beta = psycopg.conninfo.make_conninfo(substrate_dsn, user="ws_beta")
        with Substrate.connect(dsn_alpha) as alpha, Substrate.connect(dsn_beta) as beta:
            job_id = alpha.enqueue("t", source_id="ws_alpha")
            with pytest.raises(Exception, match="row-level security"):
                beta.enqueue("t", source_id="ws_alpha")  # cannot pose as another source
            assert beta.get_job(job_id) is None  # invisible, not just filtered
            assert alpha.get_job(job_id) is not None
    finally:
        with psycopg.connect(substrate_dsn, autocommit=True) as admin:
            admin.execute("DROP POLICY own_jobs ON substrate.jobs")
            admin.execute("ALTER TABLE substrate.jobs DISABLE ROW LEVEL SECURITY")
            for role in ("ws_alpha", "ws_beta"):
                admin.execute(f"DROP OWNED BY {role}")
                admin.execute(f"DROP ROLE {role}")


def test_a_waiter_reads_finished_and_pending_in_one_snapshot() -> None:
    """The waiting plan, driven by hand: every read is the one `get_result` statement,
    which says both whether the job finished and whether it is still worth waiting for.
    With two statements, a job finishing between them looked neither finished nor
    pending, and the waiter returned None for a job that had a result (seen once in CI)."""
    q = rendered_queries("substrate")
    plan = results_mod.wait_for_result(q, 7, "me", 30, channel=None, poll_secs=0.01)
    step = next(plan)
    assert isinstance(step, core.Stmt) and step.query.name == "get_result"
    not_yet = {"id": None, "foreign_job": False, "pending": True}
    step = plan.send(not_yet)
    assert isinstance(step, core.Sleep)
    step = plan.send(None)
    assert isinstance(step, core.Stmt) and step.query.name == "get_result"
    done = {
        "id": 7, "kind": "t", "state": "completed", "result": "ok", "last_error": None,
        "attempts": 1, "finished_at": datetime.now(UTC), "source_id": "me",
        "delivered_at": None, "foreign_job": False, "pending": False,
    }  # fmt: skip
    with pytest.raises(StopIteration) as stop:
        plan.send(done)
    assert stop.value.value.result == "ok"
    gone = results_mod.wait_for_result(q, 8, "me", 30, channel=None)
    assert next(gone).query.name == "get_result"  # type: ignore[union-attr]
    with pytest.raises(StopIteration) as stop:
        gone.send({"id": None, "foreign_job": False, "pending": False})
    assert stop.value.value is None
