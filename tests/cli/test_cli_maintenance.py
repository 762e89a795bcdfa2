"""recover-leases, prune and stats."""

from __future__ import annotations

import json
import signal

import psycopg

from substrate_db import JobState, Substrate
from substrate_db._queries import rendered_queries
from substrate_db.ops import prune, stats

from ._support import Run, Spawn

Q = rendered_queries("substrate")


def _expire(substrate: Substrate, *ids: int) -> None:
    """Move leases into the past (what a dead slot's jobs look like after a while)."""
    with substrate.pool.connection() as conn:
        conn.execute(
            "UPDATE substrate.jobs SET lease_expires_at = now() - interval '1 minute' "
            "WHERE id = ANY(%s)",
            [list(ids)],
        )


def test_recover_leases_one_pass(run: Run, substrate_dsn: str, substrate: Substrate) -> None:
    d = ("--dsn", substrate_dsn)
    empty = run(*d, "recover-leases")
    assert (empty.code, empty.out.strip()) == (0, "released=0 requeued=0 failed=0")

    a = substrate.enqueue("r")
    b = substrate.enqueue("r", max_attempts=1)
    substrate.enqueue("r")  # stays available
    claimed = substrate.claim_jobs("dead-slot", ["r"], 3)
    _expire(substrate, a, b)
    ran = run(*d, "recover-leases", "--json")
    assert ran.code == 0
    assert ran.json() == {
        "released": 2, "requeued": 1, "failed": 1, "requeued_ids": [a], "failed_ids": [b],
        "standing_by": False,
    }  # fmt: skip
    job_a = substrate.get_job(a)
    assert job_a is not None and job_a.state == JobState.AVAILABLE
    # The dead slot's write-back is refused by the fence once the job was claimed again.
    again = substrate.claim_next_job("live-slot", ["r"])
    assert again is not None and again.id == a
    stale = substrate.complete_job(a, next(c.claim_epoch for c in claimed if c.id == a))
    assert not stale.ok and stale.reason == "stale_epoch"


def test_second_owner_stands_by(run: Run, substrate_dsn: str) -> None:
    with psycopg.connect(substrate_dsn) as conn:  # holds the lock in an open transaction
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('substrate-recovery:' || %s, 0))",
            ["substrate"],
        )
        ran = run("--dsn", substrate_dsn, "recover-leases", "--json")
        text = run("--dsn", substrate_dsn, "recover-leases")
    assert ran.code == 0 and ran.json()["standing_by"] is True
    assert text.code == 0 and "standing-by" in text.out and "released=0" in text.out


def test_recover_leases_every_stops_on_sigterm(
    spawn_cli: Spawn, substrate_dsn: str, substrate: Substrate
) -> None:
    proc = spawn_cli("--dsn", substrate_dsn, "recover-leases", "--every", "0.1", "--json")
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["released"] == 0
    job = substrate.enqueue("loop")
    assert substrate.claim_next_job("dead", ["loop"]) is not None
    _expire(substrate, job)
    while True:  # the loop keeps passing, and finds the expired lease
        line = json.loads(proc.stdout.readline())
        if line["released"]:
            assert line["requeued_ids"] == [job]
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    for line in out.splitlines():
        assert set(json.loads(line)) >= {"released", "requeued", "failed"}
    assert "Traceback" not in err


def _finish(substrate: Substrate, kind: str, n: int, ok: bool = True) -> None:
    substrate.enqueue_many([{"kind": kind}] * n)
    while jobs := substrate.claim_jobs("s", [kind], 500):
        if ok:
            substrate.complete_jobs([(j.id, j.claim_epoch, None) for j in jobs])
        else:
            substrate.fail_jobs([(j.id, j.claim_epoch, "x", False) for j in jobs])


def test_prune(run: Run, substrate_dsn: str, substrate: Substrate) -> None:
    d = ("--dsn", substrate_dsn)
    _finish(substrate, "done", 2500)
    _finish(substrate, "bad", 20, ok=False)
    keep = substrate.enqueue("pending")
    young = run(*d, "prune", "--older-than", "1h", "--json").json()
    assert young["deleted"] == 0
    dry = run(*d, "prune", "--older-than", "0", "--state", "completed", "--dry-run", "--json")
    assert dry.json()["deleted"] == 2500 and dry.json()["dry_run"] is True
    ran = run(*d, "prune", "--older-than", "0s", "--state", "completed", "--batch-size", "1000")
    assert ran.code == 0 and "pruned 2500 job(s)" in ran.out
    rest = run(*d, "prune", "--older-than", "0", "--json").json()
    assert rest["deleted"] == 20 and rest["states"] == ["completed", "failed", "cancelled"]
    assert [j.id for j in substrate.list_jobs()] == [keep]


def test_prune_plan_batches_and_reports_progress(substrate: Substrate) -> None:
    _finish(substrate, "p", 250)
    seen: list[tuple[int, int]] = []
    result = substrate.run(
        prune(Q, 0, ["completed"], batch_size=100, progress=lambda d, t: seen.append((d, t)))
    )
    assert result.deleted == 250
    assert seen == [(0, 250), (100, 250), (200, 250), (250, 250)]


def test_stats(run: Run, substrate_dsn: str, substrate: Substrate) -> None:
    substrate.enqueue_many([{"kind": "a"}] * 3 + [{"kind": "b"}] * 2)
    running = substrate.claim_jobs("s", ["a"], 2)
    _expire(substrate, running[0].id)
    doc = run("--dsn", substrate_dsn, "stats", "--json").json()
    assert doc["totals"] == {
        "available": 3,
        "running": 2,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    by_kind = {k["kind"]: k["counts"] for k in doc["kinds"]}
    assert by_kind["a"]["running"] == 2 and by_kind["b"]["available"] == 2
    assert doc["expired_leases"] == 1 and doc["oldest_available_age_secs"] >= 0
    text = run("--dsn", substrate_dsn, "stats")
    assert text.code == 0 and "expired lease: 1" in text.out


def test_stats_plan_moves_time(substrate: Substrate) -> None:
    substrate.enqueue("t")
    job = substrate.get_job(substrate.enqueue("t"))
    assert job is not None
    from datetime import timedelta

    later = substrate.run(stats(Q, job.created_at + timedelta(hours=1)))
    assert later.oldest_available_age_secs is not None
    assert later.oldest_available_age_secs >= 3600


def test_stats_watch_prints_json_lines_until_sigterm(
    spawn_cli: Spawn, substrate_dsn: str, substrate: Substrate
) -> None:
    proc = spawn_cli("--dsn", substrate_dsn, "stats", "--watch", "--interval", "0.2", "--json")
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["totals"]["available"] == 0
    substrate.enqueue("w")
    while json.loads(proc.stdout.readline())["totals"]["available"] != 1:
        pass
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert all(json.loads(line) for line in out.splitlines())
