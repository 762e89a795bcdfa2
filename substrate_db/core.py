"""The substrate's logic without I/O: validation, parameters in, rows to results out.

Every operation is a *plan*: a generator that yields the statements to run (and
transaction boundaries) and receives their rows, then returns the operation's result.
`Substrate` drives plans on a blocking connection and `AsyncSubstrate` on an asyncio one;
neither holds logic of its own, so the two can never drift apart.

Arguments are validated when the plan is built, before a connection is taken, so bad
input raises `InvalidArgument` without touching the database.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

from ._queries import Rendered
from .errors import InvalidArgument, ResultTooLarge
from .models import (
    ClaimedJob,
    Job,
    JobState,
    RecoveryResult,
    WriteBackReason,
    WriteBackResult,
    trusted,
)

T = TypeVar("T")

# -- limits ---------------------------------------------------------------------------

MAX_NAME_LEN: Final = 200
"""Longest kind, slot id or dedupe key."""
SMALLINT_MIN: Final = -32768
SMALLINT_MAX: Final = 32767
INT_MAX: Final = 2**31 - 1
MAX_LEASE_SECS: Final = INT_MAX
"""A lease of about 68 years: past this Postgres intervals and timestamps overflow."""
MAX_ERROR_LEN: Final = 10_000
"""Error texts longer than this are cut (never refused: a failure must always be recordable)."""
RECOVERY_PAGE: Final = 1000
"""Lease recovery updates at most this many rows per statement, keeping transactions short."""
DEFAULT_LEASE_SECS: Final = 300
DEFAULT_MAX_ATTEMPTS: Final = 5

# -- plan steps -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stmt:
    """Run one named query. The plan receives a row (dict) or None for `:one`, a list of
    rows for `:many`, and the row count for `:exec`."""

    query: Rendered
    params: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Begin:
    """Open a transaction (a savepoint when one is already open)."""


@dataclass(frozen=True, slots=True)
class Commit:
    """Commit the innermost transaction opened by `Begin`."""


@dataclass(frozen=True, slots=True)
class Listen:
    """LISTEN on a channel for the rest of the plan (the driver UNLISTENs at the end)."""

    channel: str


@dataclass(frozen=True, slots=True)
class WaitNotify:
    """Wait up to `timeout` seconds for a notification on a channel the plan listens to.
    The plan receives the payloads that arrived (possibly none)."""

    timeout: float


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait `seconds` without touching the database (the polling fallback)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Batch:
    """Run several statements in one round trip (pipeline mode); each is its own
    statement, and the plan receives their results as a list, in order."""

    stmts: tuple[Stmt, ...]


BEGIN: Final = Begin()
COMMIT: Final = Commit()

Step = Stmt | Batch | Begin | Commit | Listen | WaitNotify | Sleep
Plan = Generator[Step, Any, T]


def run_one(stmt: Stmt, convert: Callable[[Any], T]) -> Plan[T]:
    """The plan of a single statement whose result is converted."""
    received = yield stmt
    return convert(received)


# -- validation -----------------------------------------------------------------------


def check_name(field: str, value: object) -> str:
    """A kind, slot id or dedupe key: a non-empty string of at most 200 characters."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LEN or "\x00" in value:
        raise InvalidArgument(
            field, value, f"a non-empty string of at most {MAX_NAME_LEN} characters"
        )
    return value


def check_kinds(value: object) -> list[str]:
    """A non-empty list of kinds. A bare string is refused: it is a sequence of letters."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgument("kinds", value, "a non-empty list of job kinds")
    kinds = list(value)
    if not kinds:
        raise InvalidArgument("kinds", value, "a non-empty list of job kinds")
    for i, kind in enumerate(kinds):
        check_name(f"kinds[{i}]", kind)
    return list(dict.fromkeys(kinds))


def check_int(field: str, value: object, low: int, high: int) -> int:
    """An integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        expected = f"an integer >= {low}" if high >= INT_MAX else f"an integer from {low} to {high}"
        raise InvalidArgument(field, value, expected)
    return value


def check_optional_name(field: str, value: object) -> str | None:
    return None if value is None else check_name(field, value)


def check_aware(field: str, value: object) -> datetime | None:
    """None, or a timezone-aware datetime: a naive one has no meaning across machines."""
    if value is None:
        return None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidArgument(field, value, "a timezone-aware datetime")
    return value


def to_json(field: str, value: object) -> str:
    """Serialise a payload or result for jsonb, refusing what jsonb would refuse later."""
    if value is None:  # most results: twice per job on a worker's hot path
        return "null"
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(field, value, f"JSON-serializable ({exc})") from None
    if "\\u0000" in text:
        raise InvalidArgument(field, value, "JSON without NUL characters (jsonb cannot store them)")
    return text


def check_seconds(field: str, value: object, *, low: float = 0.0, above: bool = False) -> float:
    """A finite number of seconds, >= low (or > low with `above`), at most ~68 years."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not (value > low if above else value >= low)
        or value > MAX_LEASE_SECS
    ):
        raise InvalidArgument(field, value, f"a number of seconds {'>' if above else '>='} {low:g}")
    return float(value)


def check_retry_in(value: object, field: str = "retry_in") -> float | None:
    return None if value is None else check_seconds(field, value)


def check_schema(value: object) -> str:
    """A schema name: a plain SQL identifier (it is quoted anyway, but we keep it boring)."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 63
        or not (value[0].isascii() and (value[0].isalpha() or value[0] == "_"))
        or not all(c.isascii() and (c.isalnum() or c == "_") for c in value)
    ):
        raise InvalidArgument(
            "schema", value, "an identifier: a letter or _, then letters, digits or _, at most 63"
        )
    return value


def check_job_id(field: str, value: object) -> int:
    return check_int(field, value, 1, 2**63 - 1)


def check_epoch(field: str, value: object) -> int:
    return check_int(field, value, 0, 2**63 - 1)


# -- enqueue --------------------------------------------------------------------------

_SPEC_KEYS: Final = frozenset(
    {
        "kind",
        "payload",
        "priority",
        "run_at",
        "max_attempts",
        "dedupe_key",
        "source_id",
        "serial_key",
    }
)


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job to insert, checked and serialised (see `job_row`)."""

    kind: str
    payload: str
    priority: int
    run_at: datetime | None
    max_attempts: int
    dedupe_key: str | None
    source_id: str | None
    serial_key: str | None


def job_row(
    prefix: str,
    kind: object,
    payload: object,
    priority: object,
    run_at: object,
    max_attempts: object,
    dedupe_key: object,
    source_id: object,
    serial_key: object,
) -> JobRow:
    return JobRow(
        kind=check_name(f"{prefix}kind", kind),
        payload=to_json(f"{prefix}payload", {} if payload is None else payload),
        priority=check_int(f"{prefix}priority", priority, SMALLINT_MIN, SMALLINT_MAX),
        run_at=check_aware(f"{prefix}run_at", run_at),
        max_attempts=check_int(f"{prefix}max_attempts", max_attempts, 1, INT_MAX),
        dedupe_key=check_optional_name(f"{prefix}dedupe_key", dedupe_key),
        source_id=check_optional_name(f"{prefix}source_id", source_id),
        serial_key=check_optional_name(f"{prefix}serial_key", serial_key),
    )


def enqueue_rows(
    q: Mapping[str, Rendered], rows: Sequence[JobRow], now: datetime | None
) -> Plan[list[tuple[int, bool]]]:
    """Insert checked rows in one statement: (id, inserted) per row, in input order
    (inserted is False when an unfinished job held the row's dedupe key: its id)."""
    if not rows:
        return []
    params = {
        "kinds": [r.kind for r in rows],
        "payloads": [r.payload for r in rows],
        "priorities": [r.priority for r in rows],
        "run_ats": [r.run_at for r in rows],
        "max_attempts": [r.max_attempts for r in rows],
        "dedupe_keys": [r.dedupe_key for r in rows],
        "source_ids": [r.source_id for r in rows],
        "serial_keys": [r.serial_key for r in rows],
        "now": now,
    }
    result = yield Stmt(q["enqueue_jobs"], params)
    return [(int(row["id"]), bool(row["inserted"])) for row in result]


def _enqueue_plan(
    q: Mapping[str, Rendered], rows: Sequence[JobRow], now: datetime | None
) -> Plan[list[int]]:
    pairs = yield from enqueue_rows(q, rows, now)
    return [job_id for job_id, _ in pairs]


def enqueue(
    q: Mapping[str, Rendered],
    kind: object,
    payload: object,
    *,
    priority: object,
    run_at: object,
    max_attempts: object,
    dedupe_key: object,
    source_id: object = None,
    serial_key: object = None,
    now: datetime | None,
) -> Plan[int]:
    row = job_row(
        "", kind, payload, priority, run_at, max_attempts, dedupe_key, source_id, serial_key
    )
    return _first(_enqueue_plan(q, [row], check_aware("now", now)))


def _first(plan: Plan[list[int]]) -> Plan[int]:
    ids = yield from plan
    return ids[0]


def enqueue_many(q: Mapping[str, Rendered], jobs: object, now: datetime | None) -> Plan[list[int]]:
    """Jobs are mappings (or models with `model_dump()`) with `kind` and the optional
    fields of `enqueue`. Unknown keys are refused, so a typo cannot pass silently."""
    if isinstance(jobs, str | bytes | Mapping) or not isinstance(jobs, Iterable):
        raise InvalidArgument("jobs", jobs, "a list of job mappings")
    rows: list[JobRow] = []
    for i, item in enumerate(jobs):
        spec = item.model_dump() if hasattr(item, "model_dump") else item
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"jobs[{i}]", item, "a mapping with at least 'kind'")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise InvalidArgument(
                f"jobs[{i}]",
                item,
                f"only the keys {sorted(_SPEC_KEYS)} (unknown: {sorted(unknown)})",
            )
        if "kind" not in spec:
            raise InvalidArgument(
                f"jobs[{i}].kind", None, "a non-empty string of at most 200 characters"
            )
        rows.append(
            job_row(
                f"jobs[{i}].",
                spec["kind"],
                spec.get("payload"),
                spec.get("priority", 0),
                spec.get("run_at"),
                spec.get("max_attempts", DEFAULT_MAX_ATTEMPTS),
                spec.get("dedupe_key"),
                spec.get("source_id"),
                spec.get("serial_key"),
            )
        )
    return _enqueue_plan(q, rows, check_aware("now", now))


# -- claim ----------------------------------------------------------------------------


def _claimed(rows: list[dict[str, Any]]) -> list[ClaimedJob]:
    # The claim's RETURNING list is exactly ClaimedJob's fields (a test holds them equal).
    jobs = [trusted(ClaimedJob, row) for row in rows]
    # UPDATE ... RETURNING gives no order; hand jobs back in claim order.
    jobs.sort(key=lambda j: (j.priority, j.run_at, j.id))
    return jobs


@dataclass(frozen=True, slots=True)
class ClaimTimeouts:
    """Bounds on the claim statement, in milliseconds (None: the server's setting)."""

    lock_timeout_ms: int | None = None
    statement_timeout_ms: int | None = None

    @classmethod
    def from_seconds(cls, lock_timeout: object, statement_timeout: object) -> ClaimTimeouts | None:
        def ms(field: str, value: object) -> int | None:
            if value is None:
                return None
            seconds = check_seconds(field, value, low=0.001)
            if seconds > INT_MAX / 1000:  # Postgres takes at most INT_MAX milliseconds
                raise InvalidArgument(field, value, f"at most {INT_MAX // 1000} seconds")
            return max(1, round(seconds * 1000))

        timeouts = cls(ms("lock_timeout", lock_timeout), ms("statement_timeout", statement_timeout))
        return None if timeouts == cls() else timeouts


def claim_jobs(
    q: Mapping[str, Rendered],
    slot_id: object,
    kinds: object,
    limit: object,
    lease_secs: object,
    now: datetime | None,
    timeouts: ClaimTimeouts | None = None,
) -> Plan[list[ClaimedJob]]:
    params = {
        "slot_id": check_name("slot_id", slot_id),
        "kinds": check_kinds(kinds),
        "limit": check_int("limit", limit, 1, INT_MAX),
        "lease_secs": check_int("lease_secs", lease_secs, 1, MAX_LEASE_SECS),
        "now": check_aware("now", now),
    }
    return _claim(q, params, timeouts)


def _claim(
    q: Mapping[str, Rendered], params: dict[str, Any], timeouts: ClaimTimeouts | None
) -> Plan[list[ClaimedJob]]:
    """One statement claims jobs with and without serial keys (sql/queries.sql). With
    timeouts, it runs in a transaction whose first statement sets them (SET LOCAL)."""
    if timeouts is not None:
        yield BEGIN
        yield Stmt(
            q["set_claim_timeouts"],
            {
                "lock_timeout": _ms_text(timeouts.lock_timeout_ms),
                "statement_timeout": _ms_text(timeouts.statement_timeout_ms),
            },
        )
    rows = yield Stmt(q["claim_jobs"], params)
    if timeouts is not None:
        yield COMMIT
    return _claimed(rows)


def _ms_text(ms: int | None) -> str | None:
    return None if ms is None else f"{ms}ms"


def claim_next_job(
    q: Mapping[str, Rendered],
    slot_id: object,
    kinds: object,
    lease_secs: object,
    now: datetime | None,
    timeouts: ClaimTimeouts | None = None,
) -> Plan[ClaimedJob | None]:
    plan = claim_jobs(q, slot_id, kinds, 1, lease_secs, now, timeouts)
    return _single_or_none(plan)


def _single_or_none(plan: Plan[list[ClaimedJob]]) -> Plan[ClaimedJob | None]:
    jobs = yield from plan
    return jobs[0] if jobs else None


# -- write-back -----------------------------------------------------------------------


# JobState(value) is an Enum lookup (240 ns); a write-back result needs one per job.
_STATE_OF: Final = {state.value: state for state in JobState}


def writeback_result(
    job_id: int,
    expected: int,
    applied: Mapping[str, Any] | None,
    found: Mapping[str, Any] | None,
) -> WriteBackResult:
    """The result of one fenced write-back: the row it updated (`applied`), or else the
    job as read after the refusal (`found`, None when the job does not exist)."""
    row = applied if applied is not None else found
    state = None if row is None else row["state"]
    actual = None if row is None else int(row["claim_epoch"])
    if applied is not None:
        reason = WriteBackReason.APPLIED
    elif state is None:
        reason = WriteBackReason.NOT_FOUND
    elif state == JobState.RUNNING and actual == 0:
        reason = WriteBackReason.PRE_FENCING
    elif actual != expected:
        reason = WriteBackReason.STALE_EPOCH
    else:
        reason = WriteBackReason.NOT_RUNNING
    return trusted(
        WriteBackResult,
        {
            "job_id": job_id,
            "ok": applied is not None,
            "reason": reason,
            "expected_epoch": expected,
            "actual_epoch": actual,
            "state": None if state is None else _STATE_OF[state],
            "lease_expires_at": None if applied is None else applied["lease_expires_at"],
        },
    )


def _check_distinct(items: Sequence[tuple[int, int, Any]], field: str) -> None:
    seen: set[int] = set()
    for job_id, _, _ in items:
        if job_id in seen:
            raise InvalidArgument(field, job_id, "each job id at most once per call")
        seen.add(job_id)


@dataclass(frozen=True, slots=True)
class PreparedWriteBack:
    """A batch write-back ready to run: its statement (None for an empty batch), the
    batch sorted by job id, and how to hand results back in the caller's order. Plans
    that send the write-back alongside other statements (the slot heartbeat) send `stmt`
    themselves and then `yield from finish(rows)`."""

    stmt: Stmt | None
    status: Rendered
    order: list[int]
    ids: list[int]
    epochs: list[int]

    def finish(self, rows: Iterable[Mapping[str, Any]]) -> Plan[list[WriteBackResult]]:
        """Results from the applied rows; the refused jobs are read once more (only when
        there are any) so each refusal says why, from the job's current state."""
        applied = {int(row["ord"]) - 1: row for row in rows}
        refused = (
            []
            if len(applied) == len(self.ids)  # the usual case: every write applied
            else [self.ids[k] for k in range(len(self.ids)) if k not in applied]
        )
        found: dict[int, Mapping[str, Any]] = {}
        if refused:
            current = yield Stmt(self.status, {"ids": refused})
            found = {int(row["id"]): row for row in current}
        results: list[WriteBackResult | None] = [None] * len(self.ids)
        for k, (job_id, epoch) in enumerate(zip(self.ids, self.epochs, strict=True)):
            results[self.order[k]] = writeback_result(
                job_id, epoch, applied.get(k), found.get(job_id)
            )
        return [r for r in results if r is not None]


def prepare_writeback(
    q: Mapping[str, Rendered],
    name: str,
    field: str,
    items: list[tuple[int, int, tuple[Any, ...]]],
    extra_arrays: Sequence[str],
    params: dict[str, Any],
) -> PreparedWriteBack:
    """Sort a batch by job id, so that concurrent batches take row locks in one order
    and cannot deadlock; results are handed back in the caller's order."""
    _check_distinct(items, field)
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    params["ids"] = ids = [items[i][0] for i in order]
    params["epochs"] = epochs = [items[i][1] for i in order]
    for k, array in enumerate(extra_arrays):
        params[array] = [items[i][2][k] for i in order]
    stmt = Stmt(q[name], params) if order else None
    return PreparedWriteBack(stmt, q["writeback_status"], order, ids, epochs)


def _writeback_plan(
    q: Mapping[str, Rendered],
    name: str,
    field: str,
    items: list[tuple[int, int, tuple[Any, ...]]],
    extra_arrays: Sequence[str],
    params: dict[str, Any],
) -> Plan[list[WriteBackResult]]:
    return _run_writeback(prepare_writeback(q, name, field, items, extra_arrays, params))


def _run_writeback(prepared: PreparedWriteBack) -> Plan[list[WriteBackResult]]:
    if prepared.stmt is None:
        return []
    rows = yield prepared.stmt
    return (yield from prepared.finish(rows))


DEFAULT_MAX_RESULT_BYTES: Final = 1024 * 1024
"""Results larger than this (as JSON, UTF-8) are refused and the job fails instead."""


def complete_jobs(
    q: Mapping[str, Rendered],
    jobs: Iterable[Sequence[Any]],
    now: datetime | None,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
) -> Plan[list[WriteBackResult]]:
    items = [
        (
            check_job_id(f"jobs[{i}].job_id", item[0]),
            check_epoch(f"jobs[{i}].claim_epoch", item[1]),
            item[2],
        )
        for i, item in enumerate(_triples("jobs", jobs, 3))
    ]
    return _complete_plan(q, items, "jobs[{}].result", check_aware("now", now), max_result_bytes)


def complete_job(
    q: Mapping[str, Rendered],
    job_id: object,
    claim_epoch: object,
    result: object,
    now: datetime | None,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
) -> Plan[WriteBackResult]:
    item = (check_job_id("job_id", job_id), check_epoch("claim_epoch", claim_epoch), result)
    return _only(_complete_plan(q, [item], "result", check_aware("now", now), max_result_bytes))


_Item = tuple[int, int, tuple[Any, ...]]


def _complete_plan(
    q: Mapping[str, Rendered],
    items: list[tuple[int, int, Any]],
    result_field: str,
    now: datetime | None,
    max_result_bytes: int,
) -> Plan[list[WriteBackResult]]:
    """Complete jobs whose result fits; fail (not retryable) those whose result is over
    `max_result_bytes`, so an oversized result ends as a visible failure rather than a
    lost job, then raise `ResultTooLarge` carrying every result. Results are serialised
    here, before the plan starts, so a bad one raises before any I/O."""
    fit: list[tuple[int, _Item]] = []
    big: list[tuple[int, _Item]] = []
    first_big: tuple[str, int] | None = None
    for pos, (job_id, epoch, result) in enumerate(items):
        field = result_field.format(pos)
        text = None if result is None else to_json(field, result)
        # A character is at most 4 bytes: only long texts need encoding to be measured.
        size = 0 if text is None else len(text)
        if size * 4 > max_result_bytes:
            size = len(text.encode()) if text is not None else 0
        if size > max_result_bytes:
            error = (
                f"result too large: {size} bytes of JSON exceeds max_result_bytes="
                f"{max_result_bytes}"
            )
            big.append((pos, (job_id, epoch, (error, False, None))))
            first_big = first_big or (field, size)
        else:
            fit.append((pos, (job_id, epoch, (text,))))
    _check_distinct([item for _, item in fit + big], "jobs" if len(items) > 1 else "job_id")
    return _complete_rows(q, fit, big, first_big, now, max_result_bytes)


def _complete_rows(
    q: Mapping[str, Rendered],
    fit: list[tuple[int, _Item]],
    big: list[tuple[int, _Item]],
    first_big: tuple[str, int] | None,
    now: datetime | None,
    max_result_bytes: int,
) -> Plan[list[WriteBackResult]]:
    params = {"now": now}
    done = yield from _writeback_plan(
        q, "complete_jobs", "jobs", [item for _, item in fit], ["results"], dict(params)
    )
    if not big:
        return done
    failed = yield from _writeback_plan(
        q, "fail_jobs", "jobs", [item for _, item in big], _FAIL_ARRAYS, dict(params)
    )
    merged: list[WriteBackResult | None] = [None] * (len(fit) + len(big))
    for (pos, _), result in zip(fit + big, done + failed, strict=True):
        merged[pos] = result
    assert first_big is not None
    raise ResultTooLarge(first_big[0], first_big[1], max_result_bytes, merged)


def _only(plan: Plan[list[WriteBackResult]]) -> Plan[WriteBackResult]:
    results = yield from plan
    return results[0]


def _error_text(field: str, error: object) -> str:
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    if not isinstance(error, str):
        raise InvalidArgument(field, error, "an error message (str) or an exception")
    error = error.replace("\x00", "\\x00")
    if len(error) > MAX_ERROR_LEN:
        marker = " ...[truncated]"
        error = error[: MAX_ERROR_LEN - len(marker)] + marker
    return error


def _fail_item(
    prefix: str,
    job_id: object,
    claim_epoch: object,
    error: object,
    retryable: object,
    retry_in: object,
) -> tuple[int, int, tuple[Any, ...]]:
    if not isinstance(retryable, bool):
        raise InvalidArgument(f"{prefix}retryable", retryable, "True or False")
    return (
        check_job_id(f"{prefix}job_id", job_id),
        check_epoch(f"{prefix}claim_epoch", claim_epoch),
        (
            _error_text(f"{prefix}error", error),
            retryable,
            check_retry_in(retry_in, f"{prefix}retry_in"),
        ),
    )


_FAIL_ARRAYS: Final = ("errors", "retryables", "retry_ins")


def fail_job(
    q: Mapping[str, Rendered],
    job_id: object,
    claim_epoch: object,
    error: object,
    retryable: object,
    retry_in: object,
    now: datetime | None,
) -> Plan[WriteBackResult]:
    item = _fail_item("", job_id, claim_epoch, error, retryable, retry_in)
    plan = _writeback_plan(
        q, "fail_jobs", "job_id", [item], _FAIL_ARRAYS, {"now": check_aware("now", now)}
    )
    return _only(plan)


def fail_jobs(
    q: Mapping[str, Rendered], jobs: Iterable[Sequence[Any]], now: datetime | None
) -> Plan[list[WriteBackResult]]:
    """Items are (job_id, claim_epoch, error) with optional retryable and retry_in after."""
    items = []
    for i, item in enumerate(_triples("jobs", jobs, 3, 5)):
        retryable = item[3] if len(item) > 3 else True
        retry_in = item[4] if len(item) > 4 else None
        items.append(_fail_item(f"jobs[{i}].", item[0], item[1], item[2], retryable, retry_in))
    return _writeback_plan(
        q, "fail_jobs", "jobs", items, _FAIL_ARRAYS, {"now": check_aware("now", now)}
    )


def prepare_extend_leases(
    q: Mapping[str, Rendered],
    jobs: Iterable[Sequence[Any]],
    lease_secs: object,
    now: datetime | None,
) -> PreparedWriteBack:
    """Items are (job_id, claim_epoch)."""
    items: list[tuple[int, int, tuple[Any, ...]]] = [
        (check_job_id(f"jobs[{i}].job_id", it[0]), check_epoch(f"jobs[{i}].claim_epoch", it[1]), ())
        for i, it in enumerate(_triples("jobs", jobs, 2))
    ]
    params = {
        "lease_secs": check_int("lease_secs", lease_secs, 1, MAX_LEASE_SECS),
        "now": check_aware("now", now),
    }
    return prepare_writeback(q, "extend_leases", "jobs", items, (), params)


def extend_leases(
    q: Mapping[str, Rendered],
    jobs: Iterable[Sequence[Any]],
    lease_secs: object,
    now: datetime | None,
) -> Plan[list[WriteBackResult]]:
    return _run_writeback(prepare_extend_leases(q, jobs, lease_secs, now))


def extend_lease(
    q: Mapping[str, Rendered],
    job_id: object,
    claim_epoch: object,
    lease_secs: object,
    now: datetime | None,
) -> Plan[WriteBackResult]:
    job_id = check_job_id("job_id", job_id)
    claim_epoch = check_epoch("claim_epoch", claim_epoch)
    return _only(extend_leases(q, [(job_id, claim_epoch)], lease_secs, now))


def _triples(field: str, value: object, size: int, most: int | None = None) -> list[Sequence[Any]]:
    """Check a batch argument: an iterable of tuples of `size` (up to `most`) items."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise InvalidArgument(field, value, "a list of tuples")
    items = list(value)
    most = most or size
    for i, item in enumerate(items):
        if (
            isinstance(item, str | bytes)
            or not isinstance(item, Sequence)
            or not size <= len(item) <= most
        ):
            shape = f"{size}" if most == size else f"{size} to {most}"
            raise InvalidArgument(f"{field}[{i}]", item, f"a tuple of {shape} items")
    return items


# -- recovery -------------------------------------------------------------------------


def release_expired_leases(
    q: Mapping[str, Rendered],
    limit: object,
    now: datetime | None,
    *,
    exclusive_schema: str | None = None,
    page_size: int = RECOVERY_PAGE,
) -> Plan[RecoveryResult | None]:
    """Release expired leases page by page, each page its own short transaction.

    With `exclusive_schema`, each page first takes the schema's recovery advisory lock
    (transaction-scoped) and the plan returns None when another owner holds it at the
    first page, or stops early when it loses the lock later.
    """
    checked_limit = None if limit is None else check_int("limit", limit, 1, INT_MAX)
    return _release_plan(q, checked_limit, check_aware("now", now), exclusive_schema, page_size)


def _release_plan(
    q: Mapping[str, Rendered],
    limit: int | None,
    now: datetime | None,
    exclusive_schema: str | None,
    page_size: int,
) -> Plan[RecoveryResult | None]:
    requeued: list[int] = []
    failed: list[int] = []
    first = True
    while True:
        page = page_size if limit is None else min(page_size, limit - len(requeued) - len(failed))
        if page <= 0:
            break
        if exclusive_schema is not None:
            yield BEGIN
            lock = yield Stmt(q["try_recovery_lock"], {"schema": exclusive_schema})
            if not lock["got"]:
                yield COMMIT
                if first:
                    return None
                break
        rows = yield Stmt(q["release_expired_leases"], {"limit": page, "now": now})
        if exclusive_schema is not None:
            yield COMMIT
        first = False
        for row in rows:
            (failed if row["state"] == JobState.FAILED else requeued).append(int(row["id"]))
        if len(rows) < page:
            break
    return RecoveryResult(
        requeued=len(requeued),
        failed=len(failed),
        requeued_ids=tuple(sorted(requeued)),
        failed_ids=tuple(sorted(failed)),
    )


# -- reads and cancel -----------------------------------------------------------------


def _job_or_none(row: Mapping[str, Any] | None) -> Job | None:
    return None if row is None else Job.model_construct(**{**row, "state": JobState(row["state"])})


def db_now(q: Mapping[str, Rendered]) -> Plan[datetime]:
    return run_one(Stmt(q["db_now"]), lambda row: row["now"])


def get_job(q: Mapping[str, Rendered], job_id: object) -> Plan[Job | None]:
    return run_one(Stmt(q["get_job"], {"id": check_job_id("job_id", job_id)}), _job_or_none)


def _jobs(rows: list[dict[str, Any]]) -> list[Job]:
    return [Job.model_construct(**{**row, "state": JobState(row["state"])}) for row in rows]


_STATES: Final = frozenset(s.value for s in JobState)


def list_jobs(
    q: Mapping[str, Rendered], kind: object, state: object, limit: object
) -> Plan[list[Job]]:
    if state is not None and (not isinstance(state, str) or state not in _STATES):
        raise InvalidArgument("state", state, f"one of {', '.join(sorted(_STATES))}")
    params = {
        "kind": check_optional_name("kind", kind),
        "state": None if state is None else str(state),
        "limit": check_int("limit", limit, 1, INT_MAX),
    }
    return run_one(Stmt(q["list_jobs"], params), _jobs)


def cancel_job(q: Mapping[str, Rendered], job_id: object, now: datetime | None) -> Plan[bool]:
    params = {"id": check_job_id("job_id", job_id), "now": check_aware("now", now)}
    return run_one(Stmt(q["cancel_job"], params), lambda row: row is not None)
