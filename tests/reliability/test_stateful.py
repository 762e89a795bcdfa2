"""The job lifecycle against a model: hypothesis drives random sequences of operations.

A `RuleBasedStateMachine` enqueues (one or many, with priorities, delays, dedupe and
serial keys), claims (one or a batch), completes, fails (retryable or not, with or
without `retry_in`), extends, cancels, releases expired leases and moves time, against
the real database and a plain Python model of the README's state machine and fencing
contract. Write-backs present the current epoch, a stale one, 0, a future one, or a job
id that does not exist, so every refusal reason is exercised.

After every step every row is read back and compared with the model: state, epoch,
attempts, run_at, lease, claimed_by, result, error, finished_at, and which job holds each
serial key. Time is moved through `now=`, never by sleeping, so the model knows the
exact clock and can predict leases, delays and which jobs are due.

Each example starts from empty tables (TRUNCATE), on one database for the whole test.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from substrate_db import Substrate, WriteBackResult

BASE = datetime(2031, 1, 1, tzinfo=UTC)
"""The model's clock starts here: later than Postgres' real clock, so every default
(created_at, run_at) comes from `now=` and is known to the model."""
KINDS = ("a", "b", "c")
SLOTS = ("slot-1", "slot-2")
MAX_STEPS = 40
EXAMPLES = 60

kinds_st = st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True)
# jsonb cannot hold NUL (the API refuses it: see test_fuzz_inputs), so results avoid it.
_text = st.text(st.characters(blacklist_characters="\x00"), max_size=5)
small_json = st.none() | st.integers(-5, 5) | _text | st.fixed_dictionaries({"n": _text})
# How a write-back picks its epoch: the job's current one, an older one, 0, a newer one.
epoch_choice = st.sampled_from(["current", "current", "current", "stale", "zero", "future"])
job_spec = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(KINDS),
        "priority": st.integers(-1, 1),
        "run_in": st.none() | st.integers(-5, 60),
        "max_attempts": st.integers(1, 3),
        "dedupe_key": st.none() | st.sampled_from(["d1", "d2"]),
        "serial_key": st.none() | st.sampled_from(["s1", "s2"]),
    }
)


@dataclass
class Model:
    """One job as the README says it must be."""

    id: int
    kind: str
    priority: int
    run_at: datetime
    max_attempts: int
    dedupe_key: str | None
    serial_key: str | None
    state: str = "available"
    epoch: int = 0
    attempts: int = 0
    lease: datetime | None = None
    claimed_by: str | None = None
    result: Any = None
    last_error: str | None = None
    finished_at: datetime | None = None

    @property
    def unfinished(self) -> bool:
        return self.state in ("available", "running")

    def order(self) -> tuple[int, datetime, int]:
        return (self.priority, self.run_at, self.id)


@dataclass
class ExpectedWrite:
    ok: bool
    reason: str
    actual: int | None


class LifecycleMachine(RuleBasedStateMachine):
    """Set `client` on a subclass: the machine runs on that client's database."""

    client: Substrate

    def __init__(self) -> None:
        super().__init__()
        with self.client.pool.connection() as conn:
            conn.execute("TRUNCATE substrate.jobs, substrate.serial_keys")
        self.now = BASE
        self.jobs: dict[int, Model] = {}

    # -- helpers ------------------------------------------------------------------------

    def pick(self, n: int) -> Model:
        """A job by index; three times in four a running one, when there is one, so that
        write-backs hit live claims and not only refusals."""
        running = sorted(i for i, j in self.jobs.items() if j.state == "running")
        ids = running if running and n % 4 else sorted(self.jobs)
        return self.jobs[ids[(n // 4) % len(ids)]]

    def epoch_for(self, job: Model, choice: str) -> int:
        return {
            "current": job.epoch,
            "stale": max(job.epoch - 1, 0),
            "zero": 0,
            "future": job.epoch + 1,
        }[choice]

    def fence(self, job: Model | None, epoch: int) -> ExpectedWrite:
        """The README's fencing contract, independently of the SQL."""
        if job is None:
            return ExpectedWrite(False, "not_found", None)
        if job.state == "running" and epoch == job.epoch:
            return ExpectedWrite(True, "applied", job.epoch)
        if job.state == "running" and job.epoch == 0:
            return ExpectedWrite(False, "pre_fencing", 0)
        if epoch != job.epoch:
            return ExpectedWrite(False, "stale_epoch", job.epoch)
        return ExpectedWrite(False, "not_running", job.epoch)

    def check_write(self, got: WriteBackResult, want: ExpectedWrite, epoch: int) -> None:
        assert (got.ok, got.reason.value, got.actual_epoch, got.expected_epoch) == (
            want.ok,
            want.reason,
            want.actual,
            epoch,
        )

    def holder(self, dedupe_key: str | None) -> Model | None:
        if dedupe_key is None:
            return None
        return next(
            (j for j in self.jobs.values() if j.dedupe_key == dedupe_key and j.unfinished), None
        )

    def claimable(self, kinds: list[str], limit: int) -> list[Model]:
        """Due available jobs of `kinds` in claim order; a serial key offers only its
        head (the first due available job of the key, of any kind) and only while no
        job of the key runs."""
        due = [j for j in self.jobs.values() if j.state == "available" and j.run_at <= self.now]
        busy = {j.serial_key for j in self.jobs.values() if j.state == "running" and j.serial_key}
        heads: dict[str, Model] = {}
        for j in sorted(due, key=Model.order):
            if j.serial_key is not None:
                heads.setdefault(j.serial_key, j)
        eligible = [
            j
            for j in due
            if j.kind in kinds
            and (j.serial_key is None or (j.serial_key not in busy and heads[j.serial_key] is j))
        ]
        return sorted(eligible, key=Model.order)[:limit]

    # -- rules --------------------------------------------------------------------------

    def _enqueue_model(self, spec: dict[str, Any], job_id: int, batch_keys: dict[str, int]) -> None:
        key = spec["dedupe_key"]
        holder = self.holder(key)
        if holder is not None:
            assert job_id == holder.id, f"dedupe key {key} is held by job {holder.id}"
            return
        if key is not None and key in batch_keys:
            assert job_id == batch_keys[key], "a key repeated in one batch folds to its first job"
            return
        assert job_id not in self.jobs
        run_at = (
            self.now if spec["run_in"] is None else self.now + timedelta(seconds=spec["run_in"])
        )
        self.jobs[job_id] = Model(
            id=job_id,
            kind=spec["kind"],
            priority=spec["priority"],
            run_at=run_at,
            max_attempts=spec["max_attempts"],
            dedupe_key=key,
            serial_key=spec["serial_key"],
        )
        if key is not None:
            batch_keys[key] = job_id

    @staticmethod
    def _api_spec(spec: dict[str, Any], now: datetime) -> dict[str, Any]:
        run_at = None if spec["run_in"] is None else now + timedelta(seconds=spec["run_in"])
        return {
            "kind": spec["kind"],
            "payload": {"p": 1},
            "priority": spec["priority"],
            "run_at": run_at,
            "max_attempts": spec["max_attempts"],
            "dedupe_key": spec["dedupe_key"],
            "serial_key": spec["serial_key"],
        }

    @initialize(specs=st.lists(job_spec, min_size=1, max_size=6))
    def start_with_jobs(self, specs: list[dict[str, Any]]) -> None:
        self.enqueue_many(specs)

    @rule(spec=job_spec)
    def enqueue(self, spec: dict[str, Any]) -> None:
        api = self._api_spec(spec, self.now)
        job_id = self.client.enqueue(api.pop("kind"), api.pop("payload"), now=self.now, **api)
        self._enqueue_model(spec, job_id, {})

    @rule(specs=st.lists(job_spec, min_size=1, max_size=4))
    def enqueue_many(self, specs: list[dict[str, Any]]) -> None:
        ids = self.client.enqueue_many([self._api_spec(s, self.now) for s in specs], now=self.now)
        assert len(ids) == len(specs)
        batch_keys: dict[str, int] = {}
        for spec, job_id in zip(specs, ids, strict=True):
            self._enqueue_model(spec, job_id, batch_keys)

    @precondition(lambda self: any(j.state == "available" for j in self.jobs.values()))
    @rule(slot=st.sampled_from(SLOTS), kinds=kinds_st, lease=st.integers(1, 120))
    def claim_next(self, slot: str, kinds: list[str], lease: int) -> None:
        self.claim(slot, kinds, None, lease)

    @precondition(lambda self: any(j.state == "available" for j in self.jobs.values()))
    @rule(
        slot=st.sampled_from(SLOTS),
        kinds=kinds_st,
        limit=st.integers(1, 4),
        lease=st.integers(1, 120),
    )
    def claim_batch(self, slot: str, kinds: list[str], limit: int, lease: int) -> None:
        self.claim(slot, kinds, limit, lease)

    def claim(self, slot: str, kinds: list[str], limit: int | None, lease: int) -> None:
        expected = self.claimable(kinds, limit or 1)
        if limit is None:
            one = self.client.claim_next_job(slot, kinds, lease, now=self.now)
            claimed = [] if one is None else [one]
        else:
            claimed = self.client.claim_jobs(slot, kinds, limit, lease, now=self.now)
        assert sorted(c.id for c in claimed) == sorted(j.id for j in expected)
        for job in expected:
            job.state, job.epoch, job.attempts = "running", job.epoch + 1, job.attempts + 1
            job.lease = self.now + timedelta(seconds=lease)
            job.claimed_by = slot
        for c in claimed:
            m = self.jobs[c.id]
            assert (c.claim_epoch, c.attempts, c.lease_expires_at, c.claimed_by) == (
                m.epoch,
                m.attempts,
                m.lease,
                slot,
            )
            assert c.idempotency_key == f"substrate-{c.id}-e{m.epoch}"

    @precondition(lambda self: self.jobs)
    @rule(n=st.integers(0, 99), choice=epoch_choice, result=small_json)
    def complete(self, n: int, choice: str, result: Any) -> None:
        job = self.pick(n)
        epoch = self.epoch_for(job, choice)
        want = self.fence(job, epoch)
        got = self.client.complete_job(job.id, epoch, result, now=self.now)
        self.check_write(got, want, epoch)
        if want.ok:
            job.state, job.result, job.lease, job.finished_at = "completed", result, None, self.now

    @precondition(lambda self: self.jobs)
    @rule(
        n=st.integers(0, 99),
        choice=epoch_choice,
        retryable=st.booleans(),
        retry_in=st.none() | st.integers(0, 90),
        error=st.text(max_size=12),
    )
    def fail(self, n: int, choice: str, retryable: bool, retry_in: int | None, error: str) -> None:
        job = self.pick(n)
        epoch = self.epoch_for(job, choice)
        want = self.fence(job, epoch)
        got = self.client.fail_job(
            job.id, epoch, error, retryable=retryable, retry_in=retry_in, now=self.now
        )
        self.check_write(got, want, epoch)
        if not want.ok:
            return
        job.last_error = error.replace("\x00", "\\x00")
        job.lease = None
        if retryable and job.attempts < job.max_attempts:
            job.state, job.claimed_by = "available", None
            if retry_in is not None:
                job.run_at = self.now + timedelta(seconds=retry_in)
            else:
                # Backoff with jitter: check the range, then adopt the database's pick.
                row = self.client.get_job(job.id)
                assert row is not None
                base = 15 + min(job.attempts, 10) ** 4
                delay = (row.run_at - self.now).total_seconds()
                assert 0.9 * base - 0.001 <= delay <= 1.1 * base + 0.001, delay
                job.run_at = row.run_at
        else:
            job.state, job.finished_at = "failed", self.now

    @precondition(lambda self: self.jobs)
    @rule(n=st.integers(0, 99), choice=epoch_choice, lease=st.integers(1, 120))
    def extend(self, n: int, choice: str, lease: int) -> None:
        job = self.pick(n)
        epoch = self.epoch_for(job, choice)
        want = self.fence(job, epoch)
        got = self.client.extend_lease(job.id, epoch, lease, now=self.now)
        self.check_write(got, want, epoch)
        if want.ok:
            job.lease = self.now + timedelta(seconds=lease)
            assert got.lease_expires_at == job.lease

    @precondition(lambda self: len(self.jobs) >= 2)
    @rule(a=st.integers(0, 99), b=st.integers(0, 99), results=st.tuples(small_json, small_json))
    def complete_batch(self, a: int, b: int, results: tuple[Any, Any]) -> None:
        first, second = self.pick(a), self.pick(b)
        if first.id == second.id:
            return
        items = [(first.id, first.epoch, results[0]), (second.id, second.epoch, results[1])]
        wants = [self.fence(first, first.epoch), self.fence(second, second.epoch)]
        got = self.client.complete_jobs(items, now=self.now)
        for (job, epoch, result), want, res in zip(
            [(first, first.epoch, results[0]), (second, second.epoch, results[1])],
            wants,
            got,
            strict=True,
        ):
            assert res.job_id == job.id
            self.check_write(res, want, epoch)
            if want.ok:
                job.state, job.result, job.lease, job.finished_at = (
                    "completed",
                    result,
                    None,
                    self.now,
                )

    @rule(n=st.integers(0, 99), missing=st.booleans())
    def write_back_missing_job(self, n: int, missing: bool) -> None:
        """A write-back for a job that does not exist is refused as not_found."""
        job_id = max(self.jobs, default=0) + 1000 + n
        got = self.client.complete_job(job_id, 1, None, now=self.now)
        self.check_write(got, self.fence(None, 1), 1)

    @precondition(lambda self: self.jobs)
    @rule(n=st.integers(0, 99))
    def cancel(self, n: int) -> None:
        job = self.pick(n)
        expected = job.unfinished
        assert self.client.cancel_job(job.id, now=self.now) is expected
        if expected:
            job.state, job.lease, job.finished_at = "cancelled", None, self.now

    @rule(limit=st.none() | st.integers(1, 3))
    def release_expired(self, limit: int | None) -> None:
        expired = sorted(
            (j for j in self.jobs.values() if j.state == "running" and j.lease <= self.now),  # type: ignore[operator]
            key=lambda j: (j.lease, j.id),
        )
        if limit is not None:
            expired = expired[:limit]
        got = self.client.release_expired_leases(limit, now=self.now)
        requeued, failed = [], []
        for job in expired:
            job.last_error = (
                f"lease expired: slot {job.claimed_by} stopped renewing epoch {job.epoch}"
            )
            job.lease, job.claimed_by = None, None
            if job.attempts >= job.max_attempts:
                job.state, job.finished_at = "failed", self.now
                failed.append(job.id)
            else:
                job.state = "available"  # run_at unchanged: claimable at once
                requeued.append(job.id)
        assert (got.requeued_ids, got.failed_ids) == (
            tuple(sorted(requeued)),
            tuple(sorted(failed)),
        )
        assert got.released == len(expired)

    @rule(seconds=st.sampled_from([0, 1, 5, 30, 61, 121, 400]))
    def advance(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    # -- the check after every step ------------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        with self.client.pool.connection() as conn:
            rows = conn.execute(
                "SELECT id, kind, state, priority, run_at, attempts, max_attempts, claim_epoch,"
                " claimed_by, lease_expires_at, dedupe_key, serial_key, result, last_error,"
                " finished_at FROM substrate.jobs ORDER BY id"
            ).fetchall()
            keys = dict(
                conn.execute(
                    "SELECT key, running_job_id FROM substrate.serial_keys"
                    " WHERE running_job_id IS NOT NULL"
                ).fetchall()
            )
        got = [tuple(r) for r in rows]
        want = [
            (
                j.id,
                j.kind,
                j.state,
                j.priority,
                j.run_at,
                j.attempts,
                j.max_attempts,
                j.epoch,
                j.claimed_by if j.state in ("running", "available") else _KEEP,
                j.lease,
                j.dedupe_key,
                j.serial_key,
                j.result,
                j.last_error,
                j.finished_at,
            )
            for j in sorted(self.jobs.values(), key=lambda j: j.id)
        ]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            # claimed_by after a job finished keeps the last claimer (cancel and a final
            # failure do not clear it; it is history, not a lease): not compared.
            expected = tuple(g[i] if w[i] is _KEEP else w[i] for i in range(len(w)))
            assert g == expected, f"job {w[0]}: database {g} != model {w}"
        running_keys = {
            j.serial_key: j.id for j in self.jobs.values() if j.state == "running" and j.serial_key
        }
        assert keys == running_keys


_KEEP = object()


def test_lifecycle_matches_model(substrate: Substrate) -> None:
    class Machine(LifecycleMachine):
        client = substrate

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=MAX_STEPS,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
