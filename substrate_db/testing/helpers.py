"""Assertions and an inline job runner for applications' tests (like rivertest or Oban.Testing).

`assert_enqueued` / `refute_enqueued` check what your code put in the queue;
`drain` / `adrain` run the queued jobs of some kinds through a handler, one at a
time in the test's own thread, with the same claim and fenced write-backs a worker
uses. Payload matching follows jsonb containment (``@>``): every key of the subset
must be present with a containing value, and every element of a subset list must be
contained in some element of the payload's list.

The drain loop is written once, as `_drain_plan`, a generator that yields what to do
next (claim, run the handler, complete, fail) and receives the answers; `drain` and
`adrain` only carry those steps out, blocking or awaited.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from substrate_db import AsyncSubstrate, ClaimedJob, Job, Substrate, WriteBackResult

__all__ = [
    "DrainOutcome",
    "DrainResult",
    "aassert_enqueued",
    "adrain",
    "arefute_enqueued",
    "assert_enqueued",
    "drain",
    "payload_contains",
    "refute_enqueued",
]

LIST_LIMIT = 10_000
"""The most jobs an assertion reads; a test queue holding more is not a test queue."""
SHOWN_IN_MESSAGES = 10
"""How many jobs an assertion message lists."""
DEFAULT_STATE = "available"


# ---------------------------------------------------------------------------
# Assertions


def payload_contains(payload: Any, subset: Any) -> bool:
    """Whether `payload` contains `subset` the way jsonb's ``@>`` decides it."""
    if isinstance(subset, Mapping):
        return isinstance(payload, Mapping) and all(
            key in payload and payload_contains(payload[key], value)
            for key, value in subset.items()
        )
    if isinstance(subset, list):
        return isinstance(payload, list) and all(
            any(payload_contains(item, wanted) for item in payload) for wanted in subset
        )
    if isinstance(subset, bool) or isinstance(payload, bool):
        # JSON true is not the number 1, although Python says True == 1.
        return type(subset) is type(payload) and subset == payload
    return bool(payload == subset)


def assert_enqueued(
    substrate: Substrate,
    kind: str,
    payload_subset: Any = None,
    *,
    state: str | None = DEFAULT_STATE,
    count: int | None = None,
) -> list[Job]:
    """Assert that jobs of `kind` in `state` (None: any) with a payload containing
    `payload_subset` (None: any payload) exist: at least one, or exactly `count`.

    Returns the matching jobs, oldest first. The AssertionError lists what was found.
    """
    _check_count(count)
    matching = _matching(
        substrate.list_jobs(kind=kind, state=state, limit=LIST_LIMIT), payload_subset
    )
    if _count_ok(len(matching), count):
        return matching
    around = substrate.list_jobs(kind=kind, limit=SHOWN_IN_MESSAGES)
    raise AssertionError(_enqueued_message(kind, payload_subset, state, count, matching, around))


def refute_enqueued(
    substrate: Substrate,
    kind: str,
    payload_subset: Any = None,
    *,
    state: str | None = DEFAULT_STATE,
) -> None:
    """Assert that no job of `kind` in `state` has a payload containing `payload_subset`."""
    matching = _matching(
        substrate.list_jobs(kind=kind, state=state, limit=LIST_LIMIT), payload_subset
    )
    if matching:
        raise AssertionError(_refute_message(kind, payload_subset, state, matching))


async def aassert_enqueued(
    substrate: AsyncSubstrate,
    kind: str,
    payload_subset: Any = None,
    *,
    state: str | None = DEFAULT_STATE,
    count: int | None = None,
) -> list[Job]:
    """`assert_enqueued` for an `AsyncSubstrate`."""
    _check_count(count)
    jobs = await substrate.list_jobs(kind=kind, state=state, limit=LIST_LIMIT)
    matching = _matching(jobs, payload_subset)
    if _count_ok(len(matching), count):
        return matching
    around = await substrate.list_jobs(kind=kind, limit=SHOWN_IN_MESSAGES)
    raise AssertionError(_enqueued_message(kind, payload_subset, state, count, matching, around))


async def arefute_enqueued(
    substrate: AsyncSubstrate,
    kind: str,
    payload_subset: Any = None,
    *,
    state: str | None = DEFAULT_STATE,
) -> None:
    """`refute_enqueued` for an `AsyncSubstrate`."""
    jobs = await substrate.list_jobs(kind=kind, state=state, limit=LIST_LIMIT)
    matching = _matching(jobs, payload_subset)
    if matching:
        raise AssertionError(_refute_message(kind, payload_subset, state, matching))


def _check_count(count: int | None) -> None:
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValueError(f"expected count to be None or an integer >= 0, got: {count!r}")


def _matching(jobs: Sequence[Job], subset: Any) -> list[Job]:
    found = [job for job in jobs if subset is None or payload_contains(job.payload, subset)]
    return sorted(found, key=lambda job: job.id)


def _count_ok(found: int, count: int | None) -> bool:
    return found >= 1 if count is None else found == count


def _what(kind: str, subset: Any, state: str | None) -> str:
    text = f"of kind {kind!r}"
    text += " in any state" if state is None else f" in state {str(state)!r}"
    if subset is not None:
        text += f" with payload containing {subset!r}"
    return text


def _enqueued_message(
    kind: str,
    subset: Any,
    state: str | None,
    count: int | None,
    matching: Sequence[Job],
    around: Sequence[Job],
) -> str:
    wanted = "at least 1 job" if count is None else f"{count} job{'' if count == 1 else 's'}"
    lines = [f"expected {wanted} {_what(kind, subset, state)}, found {len(matching)}"]
    if matching:
        lines += ["matching:", *_show(matching)]
    lines.append(
        f"newest jobs of kind {kind!r} in any state ({len(around)}):"
        if around
        else f"there are no jobs of kind {kind!r} at all"
    )
    lines += _show(around)
    return "\n".join(lines)


def _refute_message(kind: str, subset: Any, state: str | None, matching: Sequence[Job]) -> str:
    lines = [f"expected no job {_what(kind, subset, state)}, found {len(matching)}:"]
    return "\n".join(lines + _show(matching))


def _show(jobs: Sequence[Job]) -> list[str]:
    shown = [
        f"  #{job.id} {job.state} attempts={job.attempts} payload={_short(job.payload)}"
        for job in jobs[:SHOWN_IN_MESSAGES]
    ]
    if len(jobs) > SHOWN_IN_MESSAGES:
        shown.append(f"  ... and {len(jobs) - SHOWN_IN_MESSAGES} more")
    return shown


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# Draining


class DrainOutcome(StrEnum):
    """What became of one job a drain ran."""

    COMPLETED = "completed"  # the handler returned; the job is completed with its value
    RETRIED = "retried"  # the handler raised; the job is available again, after a backoff
    FAILED = "failed"  # the handler raised on the last attempt; the job is failed
    LOST = "lost"  # the write-back was refused (cancelled or reclaimed meanwhile)


@dataclass(frozen=True)
class DrainResult:
    """What a drain did: each job it ran, in order, and the exceptions handlers raised."""

    outcomes: tuple[tuple[int, DrainOutcome], ...] = ()
    errors: Mapping[int, Exception] = field(default_factory=dict)

    def _count(self, outcome: DrainOutcome) -> int:
        return sum(1 for _, got in self.outcomes if got is outcome)

    @property
    def completed(self) -> int:
        return self._count(DrainOutcome.COMPLETED)

    @property
    def retried(self) -> int:
        return self._count(DrainOutcome.RETRIED)

    @property
    def failed(self) -> int:
        return self._count(DrainOutcome.FAILED)

    @property
    def lost(self) -> int:
        return self._count(DrainOutcome.LOST)

    @property
    def ran(self) -> int:
        """How many jobs the handler was called with."""
        return len(self.outcomes)


@dataclass(frozen=True)
class _Claim:
    """Claim the next available job; answer: ClaimedJob | None."""


@dataclass(frozen=True)
class _Handle:
    """Call the handler; answer: (True, its value) or (False, the exception)."""

    job: ClaimedJob


@dataclass(frozen=True)
class _Complete:
    """Complete the job with `result`; answer: WriteBackResult."""

    job: ClaimedJob
    result: Any


@dataclass(frozen=True)
class _Fail:
    """Fail the job (retryable, with the usual backoff); answer: WriteBackResult."""

    job: ClaimedJob
    error: Exception


_Step = _Claim | _Handle | _Complete | _Fail
_DrainPlan = Generator[_Step, Any, DrainResult]


def _drain_plan(limit: int | None) -> _DrainPlan:
    """The drain loop, free of I/O: yields steps, receives their answers."""
    outcomes: list[tuple[int, DrainOutcome]] = []
    errors: dict[int, Exception] = {}
    while limit is None or len(outcomes) < limit:
        job: ClaimedJob | None = yield _Claim()
        if job is None:
            break
        returned, value = yield _Handle(job)
        written: WriteBackResult
        if returned:
            written = yield _Complete(job, value)
            outcome = DrainOutcome.COMPLETED
        else:
            errors[job.id] = value
            written = yield _Fail(job, value)
            # The fail write-back reports where the job went: back to available (a
            # retry, not run again by this drain: its run_at is in the future) or failed.
            outcome = DrainOutcome.RETRIED if written.state == "available" else DrainOutcome.FAILED
        outcomes.append((job.id, outcome if written.ok else DrainOutcome.LOST))
    return DrainResult(tuple(outcomes), errors)


def _check_drain_args(kinds: str | Sequence[str], limit: int | None) -> list[str]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"expected limit to be None or an integer >= 0, got: {limit!r}")
    return [kinds] if isinstance(kinds, str) else list(kinds)


def drain(
    substrate: Substrate,
    kinds: str | Sequence[str],
    handler: Callable[[ClaimedJob], Any],
    *,
    slot_id: str = "drain",
    limit: int | None = None,
) -> DrainResult:
    """Run every available job of `kinds` through `handler`, one at a time, inline.

    Each job is claimed as `slot_id`, passed to `handler`, then completed with the
    handler's return value, or failed with the exception it raised (retryable, with
    the usual backoff, so a retried job waits for its run_at and this drain does not
    run it again). Stops when no job is available now, or after `limit` jobs.
    """
    kinds = _check_drain_args(kinds, limit)
    plan = _drain_plan(limit)
    answer: Any = None
    try:
        while True:
            step = plan.send(answer)
            if isinstance(step, _Claim):
                answer = substrate.claim_next_job(slot_id, kinds)
            elif isinstance(step, _Handle):
                try:
                    answer = (True, handler(step.job))
                except Exception as exc:
                    answer = (False, exc)
            elif isinstance(step, _Complete):
                answer = substrate.complete_job(step.job.id, step.job.claim_epoch, step.result)
            else:
                answer = substrate.fail_job(step.job.id, step.job.claim_epoch, step.error)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def adrain(
    substrate: AsyncSubstrate,
    kinds: str | Sequence[str],
    handler: Callable[[ClaimedJob], Any | Awaitable[Any]],
    *,
    slot_id: str = "drain",
    limit: int | None = None,
) -> DrainResult:
    """`drain` for an `AsyncSubstrate`; `handler` may be a plain or a coroutine function."""
    kinds = _check_drain_args(kinds, limit)
    plan = _drain_plan(limit)
    answer: Any = None
    try:
        while True:
            step = plan.send(answer)
            if isinstance(step, _Claim):
                answer = await substrate.claim_next_job(slot_id, kinds)
            elif isinstance(step, _Handle):
                try:
                    value = handler(step.job)
                    if inspect.isawaitable(value):
                        value = await value
                    answer = (True, value)
                except Exception as exc:
                    answer = (False, exc)
            elif isinstance(step, _Complete):
                answer = await substrate.complete_job(
                    step.job.id, step.job.claim_epoch, step.result
                )
            else:
                answer = await substrate.fail_job(step.job.id, step.job.claim_epoch, step.error)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
