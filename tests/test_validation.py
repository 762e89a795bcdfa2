"""Bad input raises `InvalidArgument` naming the field and the value, and the database
is not touched (these tests run against a client whose pool points nowhere)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest

from substrate_db import AsyncSubstrate, ClaimedJob, InvalidArgument, Substrate, WriteBackResult
from substrate_db.core import check_schema


@pytest.fixture(scope="module")
def offline() -> Iterator[Substrate]:
    # A pool that can never connect: any call that reached the database would fail with
    # ConnectionFailed instead of InvalidArgument.
    client = Substrate.connect("host=/nonexistent-socket-dir dbname=none", min_size=0, timeout=0.5)
    yield client
    client.close()


NAIVE = datetime(2030, 1, 1)
LONG = "x" * 201

CASES: list[tuple[str, Callable[[Substrate], Any], str, str]] = [
    ("empty kind", lambda s: s.enqueue(""), "kind", "''"),
    ("long kind", lambda s: s.enqueue(LONG), "kind", "xxx"),
    ("kind not str", lambda s: s.enqueue(5), "kind", "5"),  # type: ignore[arg-type]
    ("nul in kind", lambda s: s.enqueue("a\x00b"), "kind", "'a\\x00b'"),
    ("payload not json", lambda s: s.enqueue("k", {"x": object()}), "payload", "object"),
    ("payload nan", lambda s: s.enqueue("k", {"x": float("nan")}), "payload", "nan"),
    ("payload nul", lambda s: s.enqueue("k", {"x": "\x00"}), "payload", "\\x00"),
    ("priority high", lambda s: s.enqueue("k", priority=32768), "priority", "32768"),
    ("priority low", lambda s: s.enqueue("k", priority=-32769), "priority", "-32769"),
    ("priority bool", lambda s: s.enqueue("k", priority=True), "priority", "True"),
    ("max_attempts 0", lambda s: s.enqueue("k", max_attempts=0), "max_attempts", "0"),
    ("naive run_at", lambda s: s.enqueue("k", run_at=NAIVE), "run_at", "2030"),
    ("empty dedupe", lambda s: s.enqueue("k", dedupe_key=""), "dedupe_key", "''"),
    ("many not list", lambda s: s.enqueue_many({"kind": "k"}), "jobs", "kind"),  # type: ignore[arg-type]
    (
        "many bad item",
        lambda s: s.enqueue_many([{"kind": "k"}, {"kind": "k", "priority": 99999}]),
        "jobs[1].priority",
        "99999",
    ),
    ("many unknown key", lambda s: s.enqueue_many([{"kind": "k", "prio": 1}]), "jobs[0]", "prio"),
    ("many no kind", lambda s: s.enqueue_many([{"payload": {}}]), "jobs[0].kind", "None"),
    ("empty kinds", lambda s: s.claim_next_job("s", []), "kinds", "[]"),
    ("kinds str", lambda s: s.claim_next_job("s", "email"), "kinds", "'email'"),
    ("kinds bad item", lambda s: s.claim_jobs("s", ["a", ""], 1), "kinds[1]", "''"),
    ("empty slot", lambda s: s.claim_next_job("", ["a"]), "slot_id", "''"),
    ("long slot", lambda s: s.claim_next_job(LONG, ["a"]), "slot_id", "xxx"),
    ("lease 0", lambda s: s.claim_next_job("s", ["a"], 0), "lease_secs", "0"),
    ("lease float", lambda s: s.claim_next_job("s", ["a"], 1.5), "lease_secs", "1.5"),  # type: ignore[arg-type]
    ("limit 0", lambda s: s.claim_jobs("s", ["a"], 0), "limit", "0"),
    ("result not json", lambda s: s.complete_job(1, 1, {1, 2}), "result", "{1, 2}"),
    ("job id 0", lambda s: s.complete_job(0, 1), "job_id", "0"),
    ("epoch negative", lambda s: s.fail_job(1, -1, "x"), "claim_epoch", "-1"),
    ("error not str", lambda s: s.fail_job(1, 1, 42), "error", "42"),  # type: ignore[arg-type]
    ("retry_in negative", lambda s: s.fail_job(1, 1, "x", retry_in=-1), "retry_in", "-1"),
    ("retryable not bool", lambda s: s.fail_job(1, 1, "x", retryable="no"), "retryable", "'no'"),  # type: ignore[arg-type]
    ("extend lease 0", lambda s: s.extend_lease(1, 1, 0), "lease_secs", "0"),
    ("batch dup ids", lambda s: s.complete_jobs([(1, 1, None), (1, 2, None)]), "jobs", "1"),
    ("batch shape", lambda s: s.complete_jobs([(1, 1)]), "jobs[0]", "(1, 1)"),  # type: ignore[list-item]
    ("release limit 0", lambda s: s.release_expired_leases(limit=0), "limit", "0"),
    ("list bad state", lambda s: s.list_jobs(state="done"), "state", "'done'"),
    ("get id str", lambda s: s.get_job("7"), "job_id", "'7'"),  # type: ignore[arg-type]
    ("naive now", lambda s: s.claim_next_job("s", ["a"], now=NAIVE), "now", "2030"),
]


@pytest.mark.parametrize(
    ("call", "field", "shown"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_names_field_and_value(
    offline: Substrate, call: Callable[[Substrate], Any], field: str, shown: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        call(offline)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    message = str(info.value)
    assert f"expected {field} to be" in message and shown in message


@pytest.mark.parametrize("schema", ["", "1abc", "a-b", "a;drop", "x" * 64, "ünï", 'a"b'])
def test_bad_schema_names(schema: str) -> None:
    with pytest.raises(InvalidArgument, match="schema"):
        check_schema(schema)
    with pytest.raises(InvalidArgument, match="schema"):
        Substrate.connect("", schema=schema)


def test_long_error_text_is_cut_not_refused() -> None:
    from substrate_db import core
    from substrate_db._queries import rendered_queries

    plan = core.fail_job(rendered_queries("substrate"), 1, 1, "e" * 50_000, True, None, None)
    step = next(plan)
    assert isinstance(step, core.Stmt) and step.params is not None
    assert len(step.params["errors"][0]) == core.MAX_ERROR_LEN


def test_sync_and_async_flavours_match() -> None:
    """The async class is the sync one, awaited: same methods, same signatures, same docs."""

    def public(cls: type) -> dict[str, Any]:
        return {n: m for n, m in vars(cls).items() if not n.startswith("_") or n == "__init__"}

    sync, async_ = public(Substrate), public(AsyncSubstrate)
    assert sync.keys() == async_.keys()
    for name, method in sync.items():
        if isinstance(method, property):
            continue
        other = async_[name]
        func = method.__func__ if isinstance(method, classmethod) else method
        afunc = other.__func__ if isinstance(other, classmethod) else other
        if name not in ("__init__",):
            assert inspect.iscoroutinefunction(afunc), name
            assert afunc.__doc__, name
        sig, asig = inspect.signature(func), inspect.signature(afunc)
        assert list(sig.parameters) == list(asig.parameters), name
        for p, ap in zip(sig.parameters.values(), asig.parameters.values(), strict=True):
            assert (p.kind, p.default) == (ap.kind, ap.default), f"{name}.{p.name}"


def test_trusted_models_are_what_model_construct_makes(substrate: Substrate) -> None:
    """models.trusted skips model_construct's per-field work on the hot paths; it must
    build the same object, from a real claim's row and a real write-back."""
    substrate.enqueue("k", {"n": 1}, serial_key="t", source_id="src")
    (job,) = substrate.claim_jobs("s", ["k"], 1)
    assert list(job.__dict__) == list(ClaimedJob.model_fields)  # the claim's RETURNING list
    made = ClaimedJob.model_construct(**job.__dict__)
    assert job == made and job.model_dump() == made.model_dump()
    assert job.model_fields_set == made.model_fields_set
    assert ClaimedJob.model_validate(job.model_dump()) == job
    result = substrate.complete_job(job.id, job.claim_epoch)
    made_result = WriteBackResult.model_construct(**result.__dict__)
    assert list(result.__dict__) == list(WriteBackResult.model_fields)
    assert result == made_result and result.model_fields_set == made_result.model_fields_set
    assert result.model_copy(update={"ok": False}).ok is False
