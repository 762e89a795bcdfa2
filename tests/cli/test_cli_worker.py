"""The ready worker: drains, fails, heartbeats, wakes on insert, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from substrate_db import AsyncSubstrate, JobState, Substrate
from substrate_db.models import ClaimedJob
from substrate_db.worker import Worker, WorkerOptions

from ._support import HERE, Run, Spawn


@pytest.fixture
def in_handlers_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(HERE)  # `--handler handlers:...` is imported from the cwd


def _states(substrate: Substrate, kind: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in substrate.list_jobs(kind=kind, limit=100_000):
        counts[job.state.value] = counts.get(job.state.value, 0) + 1
    return counts


def _wait_for(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_worker_drains_in_burst_mode(
    run: Run, substrate_dsn: str, substrate: Substrate, in_handlers_dir: None
) -> None:
    ids = substrate.enqueue_many([{"kind": "echo", "payload": {"n": i}} for i in range(300)])
    ran = run(
        "--dsn", substrate_dsn, "worker", "--kinds", "echo", "--handler", "handlers:echo",
        "--concurrency", "20", "--burst", "--json",
    )  # fmt: skip
    assert ran.code == 0, ran.err
    summary = ran.json()
    assert summary["claimed"] == summary["completed"] == 300
    assert summary["failed"] == summary["stale"] == summary["released"] == 0
    assert _states(substrate, "echo") == {"completed": 300}
    job = substrate.get_job(ids[7])
    assert job is not None and job.result == {"echo": {"n": 7}} and job.attempts == 1


def test_worker_fails_jobs_whose_handler_raises(
    run_inproc: Run, substrate_dsn: str, substrate: Substrate, in_handlers_dir: None
) -> None:
    ok, retry, perm = substrate.enqueue_many(
        [
            {"kind": "flaky", "payload": {}},
            {"kind": "flaky", "payload": {"fail": True}},
            {"kind": "flaky", "payload": {"fail": "permanent"}},
        ]
    )
    ran = run_inproc(
        "--dsn", substrate_dsn, "worker", "--kinds", "flaky",
        "--handler", "handlers:flaky", "--burst", "--json",
    )  # fmt: skip
    assert ran.code == 0, ran.err
    assert ran.json()["completed"] == 1 and ran.json()["failed"] == 2
    assert "[substrate] fail jobs.id=" in ran.err and "Traceback" not in ran.err
    j_ok, j_retry, j_perm = (substrate.get_job(i) for i in (ok, retry, perm))
    assert j_ok is not None and j_ok.state == JobState.COMPLETED and j_ok.result == "ok"
    assert j_retry is not None and j_retry.state == JobState.AVAILABLE  # backoff
    assert j_retry.last_error == f"RuntimeError: boom {retry}"
    assert j_perm is not None and j_perm.state == JobState.FAILED
    assert j_perm.last_error == "permanently broken"

    substrate.enqueue("weird")
    ran = run_inproc(
        "--dsn", substrate_dsn, "worker", "--kinds", "weird", "--handler", "handlers:not_json",
        "--burst", "--json",
    )  # fmt: skip
    assert ran.json()["failed"] == 1
    [weird] = substrate.list_jobs(kind="weird")
    assert weird.state == JobState.FAILED and "JSON" in (weird.last_error or "")


def test_async_handler(
    run_inproc: Run, substrate_dsn: str, substrate: Substrate, in_handlers_dir: None
) -> None:
    substrate.enqueue_many([{"kind": "aecho", "payload": i} for i in range(50)])
    ran = run_inproc(
        "--dsn", substrate_dsn, "worker", "--kinds", "aecho", "--handler",
        "handlers:async_echo", "--concurrency", "7", "--batch-size", "3", "--burst", "--json",
    )  # fmt: skip
    assert ran.code == 0 and ran.json()["completed"] == 50
    assert {j.result["async"] for j in substrate.list_jobs(kind="aecho")} == {True}


def test_sigterm_drains_gracefully(
    spawn_cli: Spawn, substrate_dsn: str, substrate: Substrate
) -> None:
    substrate.enqueue_many([{"kind": "slow", "payload": {"secs": 0.3}}] * 12)
    proc = spawn_cli("--dsn", substrate_dsn, "worker", "--kinds", "slow", "--handler",
        "handlers:slow", "--concurrency", "4", "--grace", "20", "--json",
    )  # fmt: skip
    _wait_for(lambda: _states(substrate, "slow").get("running", 0) > 0, "a running job")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    states = _states(substrate, "slow")
    # Every claimed job finished within the grace period; nothing is left running.
    assert "running" not in states
    assert summary["completed"] == summary["claimed"] == states["completed"]
    assert summary["released"] == 0 and "SIGTERM" in err and "Traceback" not in err


def test_sigterm_releases_jobs_that_outlive_the_grace(
    spawn_cli: Spawn, substrate_dsn: str, substrate: Substrate
) -> None:
    substrate.enqueue_many([{"kind": "stuck", "payload": {"secs": 60}}] * 2)
    proc = spawn_cli("--dsn", substrate_dsn, "worker", "--kinds", "stuck", "--handler",
        "handlers:slow", "--grace", "0.2", "--json",
    )  # fmt: skip
    _wait_for(lambda: _states(substrate, "stuck").get("running", 0) == 2, "two running jobs")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["released"] == 2
    for job in substrate.list_jobs(kind="stuck"):
        # Released: claimable again at once, the attempt counted, the reason kept.
        assert job.state == JobState.AVAILABLE and job.attempts == 1
        assert job.last_error is not None and "released" in job.last_error
    assert substrate.claim_jobs("next", ["stuck"], 5)


def test_idle_worker_wakes_on_insert(
    spawn_cli: Spawn, substrate_dsn: str, substrate: Substrate
) -> None:
    proc = spawn_cli("--dsn", substrate_dsn, "worker", "--kinds", "wake", "--handler",
        "handlers:echo", "--json",
    )  # fmt: skip
    assert proc.stderr is not None
    assert "listening" in proc.stderr.readline()  # idle now
    job_id = substrate.enqueue("wake", {"hi": 1})
    _wait_for(lambda: _states(substrate, "wake") == {"completed": 1}, "the job to complete")
    [slot] = substrate.list_slots()  # the worker is a slot: operators see it in `stats`
    assert (slot.state, slot.kinds) == ("healthy", ["wake"])
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["completed"] == 1
    [slot] = substrate.list_slots()
    assert slot.state == "gone" and slot.slot_id == json.loads(out)["slot_id"]
    job = substrate.get_job(job_id)
    assert job is not None and job.result == {"echo": {"hi": 1}}


async def test_a_lost_lease_is_noticed_and_not_written_back(
    async_substrate: AsyncSubstrate,
) -> None:
    """A job reclaimed by another slot while its handler runs: the heartbeat is refused,
    the coroutine handler is cancelled, and nothing is written back over the new claim."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hold(job: ClaimedJob) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    job_id = await async_substrate.enqueue("lease")
    worker = Worker(async_substrate, hold, WorkerOptions(kinds=["lease"], lease_secs=3))
    running = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    # Another slot takes the job over: its lease is forced out and recovery runs.
    await async_substrate.run(_expire_plan(async_substrate, job_id))
    await async_substrate.release_expired_leases()
    thief = await async_substrate.claim_next_job("thief", ["lease"])
    assert thief is not None and thief.id == job_id
    await asyncio.wait_for(cancelled.wait(), 10)  # noticed at the next heartbeat (1 s)
    worker.stop()
    stats = await asyncio.wait_for(running, 30)
    assert (stats.lost, stats.completed, stats.failed, stats.stale) == (1, 0, 0, 0)
    job = await async_substrate.get_job(job_id)
    assert job is not None and job.state == JobState.RUNNING and job.claimed_by == "thief"


def _expire_plan(substrate: AsyncSubstrate, job_id: int) -> Any:
    from substrate_db._queries import Rendered
    from substrate_db.core import Stmt

    q = Rendered(
        "expire", "exec",
        f"UPDATE {substrate.schema}.jobs SET lease_expires_at = now() - interval '1 s' "
        "WHERE id = %(id)s",
    )  # fmt: skip
    yield Stmt(q, {"id": job_id})


async def test_worker_options_are_checked(async_substrate: AsyncSubstrate) -> None:
    from substrate_db import InvalidArgument

    with pytest.raises(InvalidArgument, match="concurrency"):
        Worker(async_substrate, print, WorkerOptions(kinds=["a"], concurrency=0))
    with pytest.raises(InvalidArgument, match="kinds"):
        Worker(async_substrate, print, WorkerOptions(kinds=[]))


def test_worker_with_a_host_config(
    run_inproc: Run,
    substrate_dsn: str,
    substrate: Substrate,
    in_handlers_dir: None,
    tmp_path: Path,
) -> None:
    """--config: the credential is resolved for each connection the worker's pool opens."""
    from .test_cli_commands import _host_config

    substrate.enqueue_many([{"kind": "cfg"}] * 5)
    config = _host_config(tmp_path, substrate_dsn)
    ran = run_inproc(
        "--config", str(config), "worker", "--kinds", "cfg", "--handler", "handlers:noop",
        "--burst", "--json", env={"SUBSTRATE_CREDENTIAL_CLI_TEST": "pw"},
    )  # fmt: skip
    assert ran.code == 0, ran.err
    assert ran.json()["completed"] == 5


def test_worker_behind_pgbouncer_polls(
    run_inproc: Run, substrate_dsn: str, substrate: Substrate, in_handlers_dir: None
) -> None:
    """--pgbouncer: no LISTEN and no prepared statements; the worker still drains."""
    substrate.enqueue_many([{"kind": "pgb"}] * 30)
    ran = run_inproc(
        "--pgbouncer", "--dsn", substrate_dsn, "worker", "--kinds", "pgb", "--handler",
        "handlers:noop", "--burst", "--json",
    )  # fmt: skip
    assert ran.code == 0, ran.err
    assert ran.json()["completed"] == 30 and "polling (pgbouncer)" in ran.err
