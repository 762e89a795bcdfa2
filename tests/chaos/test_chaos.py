"""The chaos run at CI size (2,000 jobs, 4 workers); `make chaos` runs it larger.

SUBSTRATE_CHAOS_JOBS and SUBSTRATE_CHAOS_WORKERS set the size; SUBSTRATE_CHAOS_SEED replays
a run's choices of faults (not its timing). The summary is printed (run with -s to see it);
any violation fails.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from reliability._servers import ControlledPostgres

from substrate_db import Substrate

from .run import AUDIT_SQL, ChaosConfig, ChaosRun


def test_chaos_run_loses_nothing_and_does_nothing_twice(tmp_path: Path) -> None:
    config = ChaosConfig.from_env()
    with ControlledPostgres() as server:
        report = ChaosRun(server, config, tmp_path).run()
    print("\n" + report.summary())
    assert not report.violations, report.summary()
    # The faults really happened (otherwise the run proved nothing).
    assert report.kills > 0 and report.pauses > 0 and report.restarts == 1
    assert report.reclaimed_after_expiry > 0


def test_the_audit_catches_what_it_looks_for(substrate_dsn: str, tmp_path: Path) -> None:
    """The audit is the oracle of the chaos run, so it is tested too: a stale completion,
    a job leaving a terminal state, an effect applied twice and an unfinished job, made
    by hand, must each be reported."""
    run = ChaosRun(server=None, config=ChaosConfig(jobs=4), workdir=tmp_path)
    run.dsn = substrate_dsn
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        conn.execute(AUDIT_SQL)
    with Substrate.connect(substrate_dsn) as client:
        ok, stale, reopened, stuck = client.enqueue_many([{"kind": "chaos"} for _ in range(4)])
        jobs = {j.id: j for j in client.claim_jobs("slot", ["chaos"], 4)}
        assert client.complete_job(ok, jobs[ok].claim_epoch, {"epoch": 1}).ok
        assert client.complete_job(reopened, jobs[reopened].claim_epoch, {"epoch": 1}).ok
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.chaos_effects (job_id, epoch, pid) VALUES (%s, 1, 1)", [ok]
        )
        conn.execute(
            "INSERT INTO public.chaos_effects (job_id, epoch, pid) VALUES (%s, 1, 2)", [ok]
        )
        conn.execute(  # what a write-back without the fence could do
            "UPDATE substrate.jobs SET state = 'completed', result = '{\"epoch\": 0}',"
            " lease_expires_at = NULL, finished_at = now() WHERE id = %s",
            [stale],
        )
        conn.execute(
            "UPDATE substrate.jobs SET state = 'available', finished_at = NULL WHERE id = %s",
            [reopened],
        )
    run.audit()
    found = "\n".join(run.report.violations)
    assert f"job {ok}: effect applied 2 times" in found
    assert f"job {stale}: completion by epoch 0 applied while the job was at epoch 1" in found
    assert f"job {reopened}: illegal transition completed/e1 -> available/e1" in found
    assert f"job {stuck} ended running, not in a terminal state" in found
