"""Serial keys: jobs sharing a key run one at a time, in claim order."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg
import pytest

from substrate_db import JobState, Substrate


@pytest.mark.parametrize("batch", [1, 10])
def test_eight_claimers_never_run_two_jobs_of_a_key_at_once(substrate_dsn: str, batch: int) -> None:
    keys, per_key = 50, 20
    with Substrate.connect(substrate_dsn) as setup:
        # Interleave keys, and mix in jobs without a key, which must be unaffected.
        specs: list[dict[str, object]] = []
        for n in range(per_key):
            specs += [
                {"kind": "turn", "serial_key": f"conv-{k}", "payload": {"n": n}}
                for k in range(keys)
            ]
            specs.append({"kind": "turn", "payload": {"free": n}})
        setup.enqueue_many(specs)
    log: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    log_lock = threading.Lock()
    start = threading.Barrier(8)

    def slot(n: int) -> int:
        rng = random.Random(n)
        done = 0
        with Substrate.connect(substrate_dsn, max_size=1) as client:
            start.wait()
            idle = 0
            while idle < 3:
                jobs = client.claim_jobs(f"slot-{n}", ["turn"], batch, lease_secs=60)
                if not jobs:
                    idle += 1
                    time.sleep(0.01)
                    continue
                idle = 0
                assert len({j.serial_key for j in jobs if j.serial_key}) == sum(
                    1 for j in jobs if j.serial_key
                ), "a batch took two jobs of one key"
                for job in jobs:
                    began = time.monotonic()
                    time.sleep(rng.random() / 1000)
                    ended = time.monotonic()
                    if job.serial_key:
                        with log_lock:
                            log[job.serial_key].append((began, ended, job.id))
                    assert client.complete_job(job.id, job.claim_epoch).ok
                    done += 1
        return done

    with ThreadPoolExecutor(8) as pool:
        total = sum(pool.map(slot, range(8)))
    assert total == keys * per_key + per_key
    assert len(log) == keys
    for key, runs in log.items():
        runs.sort()
        assert len(runs) == per_key, key
        for (_, end, _), (begin, _, _) in itertools.pairwise(runs):
            assert end <= begin, f"two jobs of {key} overlapped"
        ids = [job_id for _, _, job_id in runs]
        assert ids == sorted(ids), f"{key} ran out of order"


def test_busy_key_blocks_only_its_own_jobs(substrate: Substrate) -> None:
    a1, a2 = substrate.enqueue_many([{"kind": "k", "serial_key": "a"}] * 2)
    free = substrate.enqueue("k")
    b1 = substrate.enqueue("k", serial_key="b")
    first = substrate.claim_jobs("s", ["k"], 10)
    assert sorted(j.id for j in first) == sorted([a1, free, b1])
    assert substrate.claim_next_job("s", ["k"]) is None  # a2 waits for a1
    running = {j.id: j for j in first}
    assert substrate.complete_job(a1, running[a1].claim_epoch).ok
    nxt = substrate.claim_next_job("s", ["k"])
    assert nxt is not None and nxt.id == a2


def test_a_busy_key_does_not_starve_other_work(substrate: Substrate) -> None:
    substrate.enqueue_many([{"kind": "k", "serial_key": "hot", "priority": -1}] * 30)
    other = substrate.enqueue("k", priority=5)
    first = substrate.claim_jobs("s", ["k"], 5)
    assert len(first) == 2 and other in {j.id for j in first}


@pytest.mark.parametrize("exit_path", ["fail_retry", "fail_final", "cancel", "recover"])
def test_every_exit_from_running_frees_the_key(substrate: Substrate, exit_path: str) -> None:
    now = substrate.db_now()
    first, second = substrate.enqueue_many(
        [{"kind": "k", "serial_key": "x", "max_attempts": 2}] * 2, now=now
    )
    job = substrate.claim_next_job("s", ["k"], lease_secs=10, now=now)
    assert job is not None and job.id == first
    assert substrate.claim_next_job("s", ["k"], now=now) is None
    later = now + timedelta(minutes=1)
    if exit_path == "fail_retry":
        assert substrate.fail_job(first, job.claim_epoch, "again", retry_in=3600, now=now).ok
    elif exit_path == "fail_final":
        assert substrate.fail_job(first, job.claim_epoch, "no", retryable=False, now=now).ok
    elif exit_path == "cancel":
        assert substrate.cancel_job(first, now=now)
    else:
        assert substrate.release_expired_leases(now=later).requeued == 1
    nxt = substrate.claim_next_job("s", ["k"], now=later)
    expected = first if exit_path == "recover" else second
    assert nxt is not None and nxt.id == expected
    stored = substrate.get_job(nxt.id)
    assert stored is not None and stored.state == JobState.RUNNING


def test_stale_snapshot_cannot_double_run_a_key(substrate: Substrate, substrate_dsn: str) -> None:
    """The race a snapshot check alone loses: a later-enqueued job that sorts first.

    A claimer whose snapshot predates another claim's commit must still see the key as
    taken, because the key row is locked and read at its newest version."""
    low = substrate.enqueue("k", serial_key="z", priority=5)
    job = substrate.claim_next_job("s1", ["k"])
    assert job is not None and job.id == low
    substrate.enqueue("k", serial_key="z", priority=-5)
    # The key is busy: the higher-priority newcomer must wait, from any slot.
    with Substrate.connect(substrate_dsn) as other:
        assert other.claim_next_job("s2", ["k"]) is None
        assert other.claim_jobs("s2", ["k"], 5) == []


def test_a_key_locked_by_another_transaction_is_not_taken(
    substrate: Substrate, substrate_dsn: str
) -> None:
    """The claim picks candidates from its snapshot, where the key looks free; the key
    row's lock, read at its newest version, is what stops it. A transaction holding the
    key row (as a concurrent claim does between taking the key and committing) makes the
    claim pass the job by, not wait, and leaves it available."""
    job_id = substrate.enqueue("k", serial_key="held")
    free = substrate.enqueue("k", priority=5)
    with psycopg.connect(substrate_dsn) as holder:
        holder.execute("SELECT 1 FROM substrate.serial_keys WHERE key = 'held' FOR UPDATE")
        claimed = substrate.claim_jobs("s", ["k"], 10)
        assert [j.id for j in claimed] == [free]
        stored = substrate.get_job(job_id)
        assert stored is not None and stored.state == JobState.AVAILABLE
        holder.rollback()
    job = substrate.claim_next_job("s", ["k"])
    assert job is not None and job.id == job_id


def test_taking_a_key_again_for_the_same_job_is_not_a_refusal(substrate_dsn: str) -> None:
    """take_serial_key may run twice for one job in one claim (Postgres re-evaluates the
    UPDATE's WHERE clause on a row's newest version): the second call must agree with the
    first, and any other job must be refused while the key is taken."""
    with Substrate.connect(substrate_dsn) as s:
        s.enqueue("k", serial_key="again")
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:

        def take(job_id: int) -> bool:
            row = conn.execute("SELECT substrate.take_serial_key('again', %s)", [job_id]).fetchone()
            assert row is not None
            return bool(row[0])

        assert take(1) and take(1)
        assert not take(2)
        conn.execute("UPDATE substrate.serial_keys SET running_job_id = NULL")
        assert take(2)


def test_a_job_updated_during_the_claim_still_takes_its_key_once(
    substrate: Substrate, substrate_dsn: str
) -> None:
    """The real path of the double call: a candidate row updated (and committed) after
    the claim's snapshot was taken is locked at its newest version, so the UPDATE meets
    a row that changed and re-evaluates its WHERE clause there, calling take_serial_key a
    second time for the same job. The job must end running and its key taken by it: a
    refusal the second time would leave the key marked by a job that never ran.

    To hold the claim inside its snapshot while another session commits, this test's
    database gets a serial_job_is_next that sleeps for one key."""
    with psycopg.connect(substrate_dsn, autocommit=True) as admin:
        body = admin.execute(
            "SELECT prosrc FROM pg_proc WHERE proname = 'serial_job_is_next'"
        ).fetchone()
        assert body is not None and "BEGIN" in body[0]
        pause = "BEGIN\n    IF p_key = 'sleep' THEN PERFORM pg_sleep(1.5); END IF;"
        sleepy = body[0].replace("BEGIN", pause, 1)
        admin.execute(
            "CREATE OR REPLACE FUNCTION substrate.serial_job_is_next(p_key text,"
            " p_priority smallint, p_run_at timestamptz, p_id bigint, p_now timestamptz)"
            " RETURNS boolean LANGUAGE plpgsql STABLE AS $body$" + sleepy + "$body$"
        )
        substrate.enqueue("k", serial_key="sleep", priority=-1)  # scanned first: the pause
        later = substrate.enqueue("k", serial_key="moved", priority=0)

        def update_during_the_pause() -> None:
            for _ in range(200):
                sleeping = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                ).fetchone()
                if sleeping and sleeping[0]:
                    break
                time.sleep(0.01)
            admin.execute("UPDATE substrate.jobs SET updated_at = now() WHERE id = %s", [later])

        updater = threading.Thread(target=update_during_the_pause)
        updater.start()
        claimed = substrate.claim_jobs("s", ["k"], 10)
        updater.join()
        assert later in {j.id for j in claimed}
        key = admin.execute(
            "SELECT running_job_id FROM substrate.serial_keys WHERE key = 'moved'"
        ).fetchone()
        assert key == (later,)
        stored = substrate.get_job(later)
        assert stored is not None and stored.state == JobState.RUNNING
