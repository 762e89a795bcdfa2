"""The chaos run: real worker processes, real faults, then an audit of what happened.

`N` worker processes (`substrate-db worker`, each its own OS process with its own pool)
work a few thousand jobs whose handler (`chaos.handler`) records its effect through the
idempotency store. A lease-recovery process (`substrate-db recover-leases --every`)
runs throughout. Meanwhile the run, at random moments:

- `kill -9`s a random worker mid-job and starts a replacement;
- pauses a random worker (SIGSTOP) for longer than its lease, then lets it go on
  (SIGCONT): a zombie executor whose jobs were reclaimed meanwhile, whose write-backs
  the fence must refuse;
- terminates random client connections with `pg_terminate_backend`;
- restarts Postgres once, in fast mode, when a share of the jobs is done.

A trigger on the jobs table keeps an audit trail: every change of state or epoch, with
the epochs before and after, the result and the error. Afterwards the run checks, and
reports as violations:

- every job reached a terminal state (the ones meant to fail `failed`, the rest
  `completed`);
- no effect was applied twice, and every completed job applied its effect once;
- every transition is one the README's state machine allows, and epochs only move by a
  claim;
- no write-back with an old epoch was applied: each completion's result carries the
  epoch of the executor that wrote it, which must be the job's epoch at that moment
  (and likewise the epoch named in a handler's failure message).

It also counts what the faults cost: jobs reclaimed after a kill (released by lease
recovery), attempts, handler runs whose effect was skipped as a duplicate.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from reliability._procs import death_signal

from substrate_db import Substrate

TESTS_DIR = Path(__file__).resolve().parents[1]
TERMINAL = ("completed", "failed", "cancelled")

AUDIT_SQL = """
CREATE TABLE public.chaos_effects (
    job_id bigint NOT NULL,
    epoch  bigint NOT NULL,
    pid    integer NOT NULL,
    at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE public.chaos_skipped (
    job_id bigint NOT NULL,
    epoch  bigint NOT NULL
);
CREATE TABLE public.chaos_history (
    seq        bigserial PRIMARY KEY,
    job_id     bigint NOT NULL,
    old_state  text NOT NULL,
    new_state  text NOT NULL,
    old_epoch  bigint NOT NULL,
    new_epoch  bigint NOT NULL,
    result     jsonb,
    last_error text,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Row locks serialise the updates of one job, so per job the seq order is commit order.
CREATE FUNCTION public.chaos_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.chaos_history
        (job_id, old_state, new_state, old_epoch, new_epoch, result, last_error)
    VALUES (NEW.id, OLD.state, NEW.state, OLD.claim_epoch, NEW.claim_epoch, NEW.result,
            NEW.last_error);
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_audit AFTER UPDATE ON substrate.jobs FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.claim_epoch IS DISTINCT FROM NEW.claim_epoch)
    EXECUTE FUNCTION public.chaos_audit();
"""

# The executor's epoch, as the chaos handler names it in its failure messages.
_FAILED_BY = re.compile(r" e(\d+)(?::|$)")

# The README's state machine: which (old, new) state pairs a single update may make,
# and whether the claim epoch goes up by one (a claim) or stays (everything else).
LEGAL = {
    ("available", "running"): 1,
    ("running", "completed"): 0,
    ("running", "failed"): 0,
    ("running", "available"): 0,
    ("running", "cancelled"): 0,
    ("available", "cancelled"): 0,
}


@dataclass
class ChaosConfig:
    jobs: int = 2000
    workers: int = 4
    concurrency: int = 4
    lease_secs: int = 3
    """The CLI's minimum: a killed worker's jobs come back about this many seconds later."""
    chaos_every: float = 0.6
    """Mean seconds between chaos actions."""
    restart_at: float = 0.4
    """Share of jobs finished when Postgres is restarted (once, fast mode)."""
    deadline_secs: float = 150.0
    seed: int = field(default_factory=lambda: random.randrange(2**32))

    @classmethod
    def from_env(cls) -> ChaosConfig:
        """SUBSTRATE_CHAOS_JOBS / _WORKERS / _SEED override the CI size (`make chaos`)."""
        config = cls()
        if jobs := os.environ.get("SUBSTRATE_CHAOS_JOBS"):
            config.jobs = int(jobs)
            config.deadline_secs = max(config.deadline_secs, config.jobs / 20)
        if workers := os.environ.get("SUBSTRATE_CHAOS_WORKERS"):
            config.workers = int(workers)
        if seed := os.environ.get("SUBSTRATE_CHAOS_SEED"):
            config.seed = int(seed)
        return config


@dataclass
class ChaosReport:
    config: ChaosConfig
    elapsed_secs: float = 0.0
    kills: int = 0
    pauses: int = 0
    terminated_connections: int = 0
    restarts: int = 0
    worker_exits: int = 0
    exit_reasons: list[str] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    reclaimed_after_expiry: int = 0
    jobs_claimed_more_than_once: int = 0
    max_attempts_seen: int = 0
    handler_failures: int = 0
    effects: int = 0
    duplicate_effect_runs_skipped: int = 0
    transitions: int = 0
    stale_refused: int = 0
    leases_lost: int = 0
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"chaos run: {self.config.jobs} jobs, {self.config.workers} workers x "
            f"{self.config.concurrency}, lease {self.config.lease_secs} s, seed {self.config.seed}",
            f"  elapsed {self.elapsed_secs:.1f} s; faults: {self.kills} kill -9, "
            f"{self.pauses} pauses past the lease, {self.terminated_connections} connections "
            f"terminated, {self.restarts} Postgres restart(s), {self.worker_exits} worker exits",
            f"  final states: {self.states}",
            f"  jobs reclaimed after a lease expired (kill, pause, lost connection): "
            f"{self.reclaimed_after_expiry}; jobs claimed more than once: "
            f"{self.jobs_claimed_more_than_once}; most attempts: {self.max_attempts_seen}",
            f"  handler failures (retried): {self.handler_failures}; effects applied: "
            f"{self.effects}; duplicate runs whose effect was skipped: "
            f"{self.duplicate_effect_runs_skipped}",
            f"  audited transitions: {self.transitions}; reported by the workers that exited "
            f"cleanly: {self.stale_refused} stale write-backs refused, {self.leases_lost} "
            "leases found lost",
            f"  violations: {len(self.violations)}",
        ]
        lines += [f"    worker exited by itself: {e}" for e in self.exit_reasons[:5]]
        lines += [f"    - {v}" for v in self.violations[:20]]
        return "\n".join(lines)


class ChaosRun:
    """One run against `server` (a `reliability._servers.ControlledPostgres`)."""

    def __init__(self, server: Any, config: ChaosConfig, workdir: Path) -> None:
        self.server = server
        self.config = config
        self.workdir = workdir
        self.rng = random.Random(config.seed)
        self.report = ChaosReport(config)
        self.dsn = ""
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stopped: list[subprocess.Popen[bytes]] = []
        self.recovery: subprocess.Popen[bytes] | None = None
        self.paused: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._spawned = 0
        self._logs: dict[int, Path] = {}

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        self.dsn = self.server.create_database("chaos")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(AUDIT_SQL)
        jobs = [
            {
                "kind": "chaos",
                "payload": {"n": i, "fail": i % 50 == 7, "flaky": i % 10 == 3},
                "max_attempts": 25,
            }
            for i in range(self.config.jobs)
        ]
        with Substrate.connect(self.dsn, max_size=1) as client:
            for start in range(0, len(jobs), 1000):
                client.enqueue_many(jobs[start : start + 1000])

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        self._spawned += 1
        log = self.workdir / f"{name}-{self._spawned}"
        env = {**os.environ, "CHAOS_DSN": self.dsn, "PYTHONPATH": str(TESTS_DIR)}
        with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "substrate_db.cli", "--dsn", self.dsn, *args],
                cwd=TESTS_DIR,
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a Ctrl-C reaches pytest, which stops them
                preexec_fn=death_signal(),  # and if pytest dies, they drain and exit
            )
        self._logs[proc.pid] = Path(f"{log}.err")
        return proc

    def start_worker(self) -> None:
        c = self.config
        args = [
            "worker", "--kinds", "chaos", "--handler", "chaos.handler:handle",
            "--concurrency", str(c.concurrency), "--batch-size", str(c.concurrency),
            "--lease-secs", str(c.lease_secs), "--grace", "2", "--json",
        ]  # fmt: skip
        self.workers.append(self._spawn(args, "worker"))

    # -- the run ----------------------------------------------------------------------------

    def progress(self) -> tuple[int, int] | None:
        """(finished, total), or None while the server is down."""
        try:
            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE state IN ('completed', 'failed', 'cancelled')),"
                    " count(*) FROM substrate.jobs"
                ).fetchone()
        except psycopg.OperationalError:
            return None
        assert row is not None
        return int(row[0]), int(row[1])

    def kill_one(self) -> None:
        with self._lock:
            live = [w for w in self.workers if w.poll() is None]
            if not live:
                return
            victim = self.rng.choice(live)
            victim.send_signal(signal.SIGKILL)
            self.paused.discard(victim)
        victim.wait()
        self.workers.remove(victim)
        self.report.kills += 1
        self.start_worker()

    def pause_one(self) -> None:
        """SIGSTOP a worker for longer than its lease (a long GC pause, a partition),
        then SIGCONT it, from a timer so the chaos goes on meanwhile."""
        with self._lock:
            live = [w for w in self.workers if w.poll() is None and w not in self.paused]
            if not live:
                return
            victim = self.rng.choice(live)
            victim.send_signal(signal.SIGSTOP)
            self.paused.add(victim)
        self.report.pauses += 1

        def resume() -> None:
            with self._lock:
                if victim in self.paused:
                    self.paused.discard(victim)
                    if victim.poll() is None:
                        victim.send_signal(signal.SIGCONT)

        timer = threading.Timer(self.config.lease_secs + 1.5, resume)
        timer.daemon = True
        timer.start()

    def terminate_connections(self) -> None:
        dbname = conninfo_to_dict(self.dsn)["dbname"]
        try:
            with psycopg.connect(self.server.conninfo_for("postgres"), autocommit=True) as conn:
                pids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = %s"
                        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                        [dbname],
                    ).fetchall()
                ]
                for pid in self.rng.sample(pids, min(len(pids), self.rng.randint(1, 3))):
                    conn.execute("SELECT pg_terminate_backend(%s)", [pid])
                    self.report.terminated_connections += 1
        except psycopg.OperationalError:
            pass  # the server is restarting: this round of chaos is skipped

    def replace_exited(self) -> None:
        """A worker may exit by itself (e.g. its pre-flight connection landed on a
        restarting server); it is replaced, and counted."""
        for w in [w for w in self.workers if w.poll() is not None]:
            self.workers.remove(w)
            self.stopped.append(w)
            self.report.worker_exits += 1
            self.report.exit_reasons.append(f"exit {w.returncode}: {self._last_error(w)}")
            self.start_worker()

    def _last_error(self, proc: subprocess.Popen[bytes]) -> str:
        log = self._logs.get(proc.pid)
        if log is None or not log.exists():
            return "?"
        lines = log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def run(self) -> ChaosReport:
        c = self.config
        started = time.monotonic()
        self.setup()
        self.recovery = self._spawn(["recover-leases", "--every", "0.5"], "recovery")
        for _ in range(c.workers):
            self.start_worker()
        restarted = False
        rounds = 0
        deadline = started + c.deadline_secs
        try:
            while time.monotonic() < deadline:
                time.sleep(self.rng.uniform(0.5, 1.5) * c.chaos_every)
                state = self.progress()
                if state is not None and state[0] == state[1]:
                    break
                self.replace_exited()
                if not restarted and state is not None and state[0] >= c.restart_at * state[1]:
                    self.server.restart("fast")
                    self.report.restarts += 1
                    restarted = True
                else:
                    # The first two rounds are a kill and a pause, so every run has both;
                    # then the mix is random.
                    action = [0.0, 0.5][rounds] if rounds < 2 else self.rng.random()
                    rounds += 1
                    if action < 0.45:
                        self.kill_one()
                    elif action < 0.65:
                        self.pause_one()
                    else:
                        self.terminate_connections()
            else:
                self.report.violations.append(
                    f"not every job finished within {c.deadline_secs} s: {self.progress()}"
                )
        finally:
            self.stop_all()
        self.report.elapsed_secs = time.monotonic() - started
        self.audit()
        return self.report

    def stop_all(self) -> None:
        with self._lock:
            for p in self.paused:
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)
            self.paused.clear()
        procs = [p for p in [*self.workers, self.recovery] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                self.report.violations.append(f"process {p.pid} ignored SIGTERM for 30 s")
        self.stopped += self.workers
        self.workers = []
        for log in sorted(self.workdir.glob("worker-*.out")):
            with contextlib.suppress(ValueError):
                text = log.read_text().strip()
                if text:
                    stats = json.loads(text.splitlines()[-1])
                    self.report.stale_refused += int(stats.get("stale", 0))
                    self.report.leases_lost += int(stats.get("lost", 0))

    # -- the audit ----------------------------------------------------------------------------

    def audit(self) -> None:
        r = self.report
        with psycopg.connect(self.dsn) as conn:
            jobs = conn.execute(
                "SELECT id, state, claim_epoch, attempts, payload, result FROM substrate.jobs"
            ).fetchall()
            effects = conn.execute(
                "SELECT job_id, count(*) FROM public.chaos_effects GROUP BY job_id"
            ).fetchall()
            skipped = conn.execute("SELECT count(*) FROM public.chaos_skipped").fetchone()
            history = conn.execute(
                "SELECT job_id, old_state, new_state, old_epoch, new_epoch, result, last_error"
                " FROM public.chaos_history ORDER BY job_id, seq"
            ).fetchall()
        effect_count = dict(effects)
        r.duplicate_effect_runs_skipped = int(skipped[0]) if skipped else 0
        r.effects = sum(effect_count.values())
        r.transitions = len(history)
        for job_id, state, epoch, attempts, payload, result in jobs:
            r.states[state] = r.states.get(state, 0) + 1
            r.max_attempts_seen = max(r.max_attempts_seen, attempts)
            if epoch > 1:
                r.jobs_claimed_more_than_once += 1
            want = "failed" if payload.get("fail") else "completed"
            if state not in TERMINAL:
                r.violations.append(f"job {job_id} ended {state}, not in a terminal state")
            elif state != want:
                r.violations.append(f"job {job_id} ended {state}, expected {want}")
            applied = effect_count.get(job_id, 0)
            if applied > 1:
                r.violations.append(f"job {job_id}: effect applied {applied} times")
            if state == "completed":
                if applied != 1:
                    r.violations.append(f"job {job_id} completed with {applied} effects")
                if result is None or result.get("epoch") != epoch:
                    r.violations.append(
                        f"job {job_id} completed with result {result} under epoch {epoch}"
                    )
        self._audit_history(history)

    def _audit_history(self, history: list[tuple[Any, ...]]) -> None:
        r = self.report
        current: dict[int, tuple[str, int]] = {}
        for job_id, old, new, old_epoch, new_epoch, result, error in history:
            state, epoch = current.get(job_id, ("available", 0))
            if (old, old_epoch) != (state, epoch):
                r.violations.append(
                    f"job {job_id}: transition from {old}/e{old_epoch} but the trail says "
                    f"{state}/e{epoch}"
                )
            step = LEGAL.get((old, new))
            if step is None or new_epoch != old_epoch + step:
                r.violations.append(
                    f"job {job_id}: illegal transition {old}/e{old_epoch} -> {new}/e{new_epoch}"
                )
            if new == "completed" and (result or {}).get("epoch") != old_epoch:
                r.violations.append(
                    f"job {job_id}: completion by epoch {(result or {}).get('epoch')} applied "
                    f"while the job was at epoch {old_epoch} (a stale write-back)"
                )
            if old == "running" and new in ("available", "failed") and error:
                if error.startswith("lease expired"):
                    r.reclaimed_after_expiry += 1
                    if not error.endswith(f"epoch {old_epoch}"):
                        r.violations.append(f"job {job_id}: recovery of the wrong epoch: {error}")
                elif named := _FAILED_BY.search(error):
                    r.handler_failures += 1
                    if int(named.group(1)) != old_epoch:
                        r.violations.append(
                            f"job {job_id}: failure by epoch {named.group(1)} applied at "
                            f"epoch {old_epoch}"
                        )
            current[job_id] = (new, new_epoch)
