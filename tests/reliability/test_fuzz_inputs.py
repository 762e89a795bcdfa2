"""Bad API input, fuzzed: every bad value raises `InvalidArgument` naming its field, and
the database is left exactly as it was.

Each case replaces one argument of one public method with values drawn by hypothesis
(wrong types, out-of-range numbers, bools where integers are expected, naive datetimes,
empty, over-long or NUL-carrying names, values JSON or jsonb cannot hold, malformed
batches) and keeps the other arguments valid, pointing at a live running job, so a bad
value that slipped through would change something. `InvalidArgument` must be raised
(it is a `ValueError`), its `field` must name the argument, and a fingerprint of the
schema (every row of every table, the id sequence, the relations) must not move.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from substrate_db import AsyncSubstrate, InvalidArgument, Substrate

from ._fingerprint import fingerprint
from .conftest import Seeded

EXAMPLES = 50
INT_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1
STATES = {"available", "running", "completed", "failed", "cancelled"}


# -- bad values ---------------------------------------------------------------------------

_not_str = st.one_of(
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(max_size=4),
    st.lists(st.text(max_size=2), max_size=2),
)


def bad_name(*, optional: bool = False) -> st.SearchStrategy[Any]:
    """Not a non-empty str of at most 200 characters without NUL."""
    values = st.one_of(
        st.just(""),
        st.text(min_size=201, max_size=240),
        st.tuples(st.text(max_size=4), st.text(max_size=4)).map(lambda t: f"{t[0]}\x00{t[1]}"),
        _not_str,
    )
    return values if optional else values | st.none()


def bad_int(low: int, high: int, *, optional: bool = False) -> st.SearchStrategy[Any]:
    """Not an int in [low, high]: out of range, bool, float, str (even "5"), None."""
    values = st.one_of(
        st.integers(max_value=low - 1),
        st.integers(min_value=high + 1),
        st.booleans(),
        st.floats(),
        st.integers(low, min(high, low + 5)).map(str),
        st.integers(low, min(high, low + 5)).map(float),
    )
    return values if optional else values | st.none()


bad_aware = st.one_of(
    st.datetimes(),  # naive: meaningless across machines
    st.dates(),
    st.text(max_size=6),
    st.integers(),
    st.floats(),
)
bad_json = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.sampled_from([math.nan, math.inf]).map(lambda f: {"x": [f]}),
    st.builds(object),
    st.sets(st.integers(), min_size=1, max_size=3),
    st.binary(min_size=1, max_size=4),
    st.text(max_size=4).map(lambda t: {"s": t + "\x00"}),  # jsonb cannot store NUL
    st.tuples(st.integers(), st.integers()).map(lambda k: {k: 1}),  # non-str keys
)
bad_kinds = st.one_of(
    st.just([]),
    st.text(max_size=5),  # a bare string is a sequence of letters, not a list of kinds
    st.binary(max_size=3),
    st.integers(),
    st.none(),
    st.tuples(st.lists(st.just("ok"), max_size=2), bad_name()).map(lambda t: [*t[0], t[1]]),
)
bad_bool = st.one_of(st.integers(), st.none(), st.text(max_size=3), st.floats())
bad_retry_in = st.one_of(
    st.floats(max_value=-0.001),
    st.integers(max_value=-1),
    st.sampled_from([math.nan, math.inf, True, False, "5", 2**31]),
)
bad_error = st.one_of(st.integers(), st.none(), st.binary(max_size=3), st.lists(st.integers()))
bad_state = st.text(max_size=10).filter(lambda s: s not in STATES) | st.integers()
bad_schema = st.one_of(
    st.just(""),
    st.text(min_size=1, max_size=70).filter(lambda s: not (s.isascii() and s.isidentifier())),
    st.text("abc_", min_size=64, max_size=70),
    st.sampled_from(['substrate"; DROP SCHEMA public; --', "a.b", "a b", "1abc", "é"]),
    _not_str,
)
bad_batch = st.one_of(
    st.text(max_size=4),
    st.integers(),
    st.none(),
    st.just({"id": 1}),
    st.lists(st.tuples(st.integers(1, 5)), min_size=1, max_size=2),  # too short
    st.lists(st.text(min_size=3, max_size=3), min_size=1, max_size=2),  # strings
)


# -- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    field: str
    bad: st.SearchStrategy[Any]
    call: Callable[[Seeded, Any], Any]


def _enqueue(s: Seeded, **over: Any) -> Any:
    args: dict[str, Any] = {"kind": "work", "payload": {"a": 1}} | over
    return s.client.enqueue(args.pop("kind"), args.pop("payload"), **args)


def _many(s: Seeded, **over: Any) -> Any:
    return s.client.enqueue_many([{"kind": "work"}, {"kind": "work", **over}])


CASES = [
    Case("enqueue.kind", "kind", bad_name(), lambda s, v: _enqueue(s, kind=v)),
    Case("enqueue.payload", "payload", bad_json, lambda s, v: _enqueue(s, payload=v)),
    Case(
        "enqueue.priority", "priority", bad_int(-32768, 32767), lambda s, v: _enqueue(s, priority=v)
    ),
    Case("enqueue.run_at", "run_at", bad_aware, lambda s, v: _enqueue(s, run_at=v)),
    Case(
        "enqueue.max_attempts",
        "max_attempts",
        bad_int(1, INT_MAX),
        lambda s, v: _enqueue(s, max_attempts=v),
    ),
    Case(
        "enqueue.dedupe_key",
        "dedupe_key",
        bad_name(optional=True),
        lambda s, v: _enqueue(s, dedupe_key=v),
    ),
    Case(
        "enqueue.source_id",
        "source_id",
        bad_name(optional=True),
        lambda s, v: _enqueue(s, source_id=v),
    ),
    Case(
        "enqueue.serial_key",
        "serial_key",
        bad_name(optional=True),
        lambda s, v: _enqueue(s, serial_key=v),
    ),
    Case("enqueue.now", "now", bad_aware, lambda s, v: _enqueue(s, now=v)),
    Case(
        "enqueue_many.jobs",
        "jobs",
        bad_batch | st.just({"kind": "work"}),
        lambda s, v: s.client.enqueue_many(v),
    ),
    Case(
        "enqueue_many.item",
        "jobs[1]",
        st.one_of(
            st.integers(),
            st.text(max_size=3),
            st.just({"kind": "work", "prio": 1}),
            st.just({"payload": {}}),
        ),
        lambda s, v: s.client.enqueue_many([{"kind": "work"}, v]),
    ),
    Case("enqueue_many.kind", "jobs[1].kind", bad_name(), lambda s, v: _many(s, kind=v)),
    Case("enqueue_many.payload", "jobs[1].payload", bad_json, lambda s, v: _many(s, payload=v)),
    Case(
        "enqueue_many.priority",
        "jobs[1].priority",
        bad_int(-32768, 32767),
        lambda s, v: _many(s, priority=v),
    ),
    Case("enqueue_many.run_at", "jobs[1].run_at", bad_aware, lambda s, v: _many(s, run_at=v)),
    Case(
        "enqueue_many.serial_key",
        "jobs[1].serial_key",
        bad_name(optional=True),
        lambda s, v: _many(s, serial_key=v),
    ),
    Case("claim.slot_id", "slot_id", bad_name(), lambda s, v: s.client.claim_next_job(v, ["work"])),
    Case("claim.kinds", "kinds", bad_kinds, lambda s, v: s.client.claim_next_job("slot", v)),
    Case(
        "claim.lease_secs",
        "lease_secs",
        bad_int(1, INT_MAX),
        lambda s, v: s.client.claim_next_job("slot", ["work"], v),
    ),
    Case(
        "claim.now", "now", bad_aware, lambda s, v: s.client.claim_next_job("slot", ["work"], now=v)
    ),
    Case(
        "claim_jobs.limit",
        "limit",
        bad_int(1, INT_MAX),
        lambda s, v: s.client.claim_jobs("slot", ["work"], v),
    ),
    Case(
        "complete.job_id",
        "job_id",
        bad_int(1, BIGINT_MAX),
        lambda s, v: s.client.complete_job(v, s.running_epoch),
    ),
    Case(
        "complete.claim_epoch",
        "claim_epoch",
        bad_int(0, BIGINT_MAX),
        lambda s, v: s.client.complete_job(s.running_id, v),
    ),
    Case(
        "complete.result",
        "result",
        bad_json,
        lambda s, v: s.client.complete_job(s.running_id, s.running_epoch, v),
    ),
    Case(
        "complete.now",
        "now",
        bad_aware,
        lambda s, v: s.client.complete_job(s.running_id, s.running_epoch, now=v),
    ),
    Case("complete_jobs.jobs", "jobs", bad_batch, lambda s, v: s.client.complete_jobs(v)),
    Case(
        "complete_jobs.duplicate",
        "jobs",
        st.just(None),
        lambda s, v: s.client.complete_jobs(
            [(s.running_id, s.running_epoch, v), (s.running_id, s.running_epoch, v)]
        ),
    ),
    Case(
        "complete_jobs.result",
        "jobs[0].result",
        bad_json,
        lambda s, v: s.client.complete_jobs([(s.running_id, s.running_epoch, v)]),
    ),
    Case(
        "fail.error",
        "error",
        bad_error,
        lambda s, v: s.client.fail_job(s.running_id, s.running_epoch, v),
    ),
    Case(
        "fail.retryable",
        "retryable",
        bad_bool,
        lambda s, v: s.client.fail_job(s.running_id, s.running_epoch, "e", retryable=v),
    ),
    Case(
        "fail.retry_in",
        "retry_in",
        bad_retry_in,
        lambda s, v: s.client.fail_job(s.running_id, s.running_epoch, "e", retry_in=v),
    ),
    Case(
        "fail.job_id", "job_id", bad_int(1, BIGINT_MAX), lambda s, v: s.client.fail_job(v, 1, "e")
    ),
    Case("fail_jobs.jobs", "jobs", bad_batch, lambda s, v: s.client.fail_jobs(v)),
    Case(
        "extend.lease_secs",
        "lease_secs",
        bad_int(1, INT_MAX),
        lambda s, v: s.client.extend_lease(s.running_id, s.running_epoch, v),
    ),
    Case(
        "extend.claim_epoch",
        "claim_epoch",
        bad_int(0, BIGINT_MAX),
        lambda s, v: s.client.extend_lease(s.running_id, v, 60),
    ),
    Case("extend_leases.jobs", "jobs", bad_batch, lambda s, v: s.client.extend_leases(v, 60)),
    Case(
        "release.limit",
        "limit",
        bad_int(1, INT_MAX, optional=True),
        lambda s, v: s.client.release_expired_leases(v),
    ),
    Case("release.now", "now", bad_aware, lambda s, v: s.client.release_expired_leases(now=v)),
    Case(
        "release_exclusive.limit",
        "limit",
        bad_int(1, INT_MAX, optional=True),
        lambda s, v: s.client.release_expired_leases_exclusive(v),
    ),
    Case("cancel.job_id", "job_id", bad_int(1, BIGINT_MAX), lambda s, v: s.client.cancel_job(v)),
    Case("cancel.now", "now", bad_aware, lambda s, v: s.client.cancel_job(s.running_id, now=v)),
    Case("get_job.job_id", "job_id", bad_int(1, BIGINT_MAX), lambda s, v: s.client.get_job(v)),
    Case("list_jobs.state", "state", bad_state, lambda s, v: s.client.list_jobs(state=v)),
    Case(
        "list_jobs.kind", "kind", bad_name(optional=True), lambda s, v: s.client.list_jobs(kind=v)
    ),
    Case("list_jobs.limit", "limit", bad_int(1, INT_MAX), lambda s, v: s.client.list_jobs(limit=v)),
    Case(
        "fetch_results.source_id", "source_id", bad_name(), lambda s, v: s.client.fetch_results(v)
    ),
    Case(
        "fetch_results.limit",
        "limit",
        bad_int(1, INT_MAX),
        lambda s, v: s.client.fetch_results("src", limit=v),
    ),
    Case(
        "get_result.job_id",
        "job_id",
        bad_int(1, BIGINT_MAX),
        lambda s, v: s.client.get_result(v, source_id="src"),
    ),
    Case(
        "wait_for_result.timeout",
        "timeout",
        st.one_of(
            st.floats(max_value=-0.001), st.sampled_from([math.nan, math.inf, True, "1", None])
        ),
        lambda s, v: s.client.wait_for_result(s.available_id, source_id="src", timeout=v),
    ),
    Case(
        "prune_slots.older_than_secs",
        "older_than_secs",
        bad_int(1, INT_MAX),
        lambda s, v: s.client.prune_slots(v),
    ),
    Case("Substrate.schema", "schema", bad_schema, lambda s, v: Substrate(s.client.pool, schema=v)),
    Case(
        "Substrate.max_result_bytes",
        "max_result_bytes",
        bad_int(1, 2**40),
        lambda s, v: Substrate(s.client.pool, max_result_bytes=v),
    ),
    # connect() refuses a bad schema before it opens a pool (no connection is made).
    Case(
        "connect.schema",
        "schema",
        bad_schema,
        lambda s, v: Substrate.connect("host=/nonexistent", schema=v),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_invalid_argument_and_changes_nothing(seeded: Seeded, case: Case) -> None:
    @given(bad=case.bad)
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(bad: Any) -> None:
        with pytest.raises(InvalidArgument) as caught:
            case.call(seeded, bad)
        error = caught.value
        assert isinstance(error, ValueError)
        assert error.field.startswith(case.field), (error.field, case.field)
        # The message names the field, says what was expected, and shows the value.
        assert str(error).startswith(f"expected {error.field} to be ")
        assert fingerprint(seeded.check_conn) == seeded.before

    check()


def test_fail_jobs_names_the_item_of_a_bad_retry_in(seeded: Seeded) -> None:
    """In a batch, every other field is named with its item (`jobs[0].retryable`)."""
    with pytest.raises(InvalidArgument) as caught:
        seeded.client.fail_jobs([(seeded.running_id, seeded.running_epoch, "e", True, -1)])
    assert fingerprint(seeded.check_conn) == seeded.before
    assert caught.value.field == "jobs[0].retry_in"


def test_wait_for_result_refuses_a_bad_poll_interval(seeded: Seeded) -> None:
    """poll_secs <= 0 would spin (0) or hand a negative timeout to the driver."""
    for bad in (0, -1, math.nan, math.inf, "1", True):
        with pytest.raises(InvalidArgument) as caught:
            seeded.client.wait_for_result(
                seeded.available_id, source_id="src", timeout=0.05, poll_secs=bad
            )
        assert caught.value.field == "poll_secs"
    assert fingerprint(seeded.check_conn) == seeded.before


async def test_async_client_refuses_the_same_values(seeded: Seeded) -> None:
    """The async client shares the plans, so the same checks apply; spot-check that the
    asyncio shells do not touch the database first."""
    dsn = seeded.dsn
    async with await AsyncSubstrate.connect(dsn, max_size=1) as client:
        calls = [
            ("kind", client.enqueue("")),
            ("priority", client.enqueue("work", priority=40000)),
            ("kinds", client.claim_jobs("slot", "work", 1)),
            ("lease_secs", client.claim_next_job("slot", ["work"], 0)),
            ("claim_epoch", client.complete_job(seeded.running_id, -1)),
            (
                "retry_in",
                client.fail_job(seeded.running_id, seeded.running_epoch, "e", retry_in=-1),
            ),
            ("now", client.release_expired_leases(now=datetime(2030, 1, 1))),
        ]
        for field, call in calls:
            with pytest.raises(InvalidArgument) as caught:
                await call
            assert caught.value.field == field
    assert fingerprint(seeded.check_conn) == seeded.before
