"""The library's log lines: one function per line, the only place they are formatted.

These lines are a stable contract (the README quotes them; tests check them). The
functions of the first section produce the lines the intake issue lists; the ones
marked *added* extend the set without changing any of those. Every line starts with
`[substrate] ` and is emitted at the level noted, through the `substrate_db` logger,
which has only a `NullHandler`: the runtime's own logging configuration decides what
is shown.

Free text (error messages, failure reasons) is put on one line and cut to
`MAX_TEXT` characters, so a line is always one line of bounded length.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final

logger: Final = logging.getLogger("substrate_db")

PREFIX: Final = "[substrate]"
MAX_TEXT: Final = 500


def text(value: object) -> str:
    """Free text for a log line: whitespace collapsed to single spaces, length bounded."""
    if isinstance(value, BaseException):
        value = str(value) or type(value).__name__
    flat = " ".join(str(value).split())
    if len(flat) > MAX_TEXT:
        flat = flat[: MAX_TEXT - 3] + "..."
    return flat


# -- the contract ------------------------------------------------------------------------


def claim(slot_id: str, kinds: Iterable[str], job_id: int) -> str:
    """INFO, after a claim that returned a job."""
    return f"{PREFIX} claim slot={slot_id} kinds={','.join(kinds)} result={job_id}"


def complete(job_id: int, epoch: int) -> str:
    """INFO, after an applied `complete_job`."""
    return f"{PREFIX} complete jobs.id={job_id} epoch={epoch}"


def fail(job_id: int, epoch: int, reason: object) -> str:
    """INFO, after an applied `fail_job`; `reason` is the local task's error."""
    return f"{PREFIX} fail jobs.id={job_id} epoch={epoch} reason={text(reason)}"


def complete_failed(job_id: int, epoch: int, reason: str) -> str:
    """WARNING, a refused `complete_job` that is not an epoch mismatch
    (`not_running`, `not_found`)."""
    return f"{PREFIX} complete-failed jobs.id={job_id} epoch={epoch} reason={reason}"


def fail_failed(job_id: int, epoch: int, reason: str) -> str:
    """WARNING, a refused `fail_job`, whatever the reason (`stale_epoch`, ...)."""
    return f"{PREFIX} fail-failed jobs.id={job_id} epoch={epoch} reason={reason}"


def complete_epoch_mismatch(job_id: int, expected: int, actual: int) -> str:
    """WARNING, a refused `complete_job` because the job was claimed again since
    (`stale_epoch`), or is a running row written before fencing existed (`actual=0`)."""
    why = "pre-fencing row" if actual == 0 else "stale executor"
    return (
        f"{PREFIX} complete-epoch-mismatch jobs.id={job_id} expected={expected} "
        f"actual={actual} ({why}, ignored)"
    )


def write_back_error(message: object, job_id: int | str) -> str:
    """WARNING, a write-back that raised (swallowed: lease recovery reconciles)."""
    return f"{PREFIX} write-back error={text(message)} jobs.id={job_id}"


def lease_recovery(released: int) -> str:
    """INFO, after lease recovery released jobs; never emitted for 0."""
    return f"{PREFIX} lease-recovery released={released}"


def lease_recovery_error(message: object) -> str:
    """WARNING, lease recovery raised (swallowed; tried again a cadence later)."""
    return f"{PREFIX} lease-recovery error={text(message)}"


def skip(reason: str, message: object, job_id: int | None = None) -> str:
    """WARNING, a tick that could not hand a job to the local queue (see `SkipReason`)."""
    line = f"{PREFIX} skip reason={reason} error={text(message)}"
    return line if job_id is None else f"{line} jobs.id={job_id}"


# -- added -------------------------------------------------------------------------------


def claim_none(slot_id: str, kinds: Iterable[str]) -> str:
    """DEBUG (added), a claim that found no job: below INFO, so an idle tick is silent."""
    return f"{PREFIX} claim slot={slot_id} kinds={','.join(kinds)} result=none"


def write_back_ignored(source: str, why: str) -> str:
    """DEBUG (added), `write_back` left a task alone (not from the substrate, or its
    payload lacks what a fenced write-back needs)."""
    return f"{PREFIX} write-back ignored source={text(source)} reason={why}"


def lease_recovery_busy() -> str:
    """DEBUG (added), another owner holds the lease-recovery lock: nothing done."""
    return f"{PREFIX} lease-recovery skipped reason=another-owner-running"


def lease_lost(job_id: int, epoch: int, reason: str) -> str:
    """WARNING (added), a `LeaseKeeper` beat was refused: the job is no longer this
    executor's (`stale_epoch`, `not_running`, `not_found`) and should stop."""
    return f"{PREFIX} lease-lost jobs.id={job_id} epoch={epoch} reason={reason}"


def lease_keeper_error(message: object) -> str:
    """WARNING (added), a `LeaseKeeper` beat raised; the keeper keeps beating."""
    return f"{PREFIX} lease-keeper error={text(message)}"


def callback_error(what: str, message: object) -> str:
    """ERROR (added), a runtime callback (e.g. `on_lost`) raised; swallowed."""
    return f"{PREFIX} callback-error callback={what} error={text(message)}"


# -- results and slots (added) -------------------------------------------------------------


def result_source_mismatch(job_id: object, source_id: object) -> str:
    """WARNING (added), a source asked for the result of another source's job."""
    return f"{PREFIX} result-source-mismatch jobs.id={job_id} source={text(source_id)}"


def slot_beat_failed(slot_id: str, failures: int, message: object) -> str:
    """WARNING (added), a slot heartbeat failed: logged on the first 3 failures in a row
    and every 10th after."""
    return f"{PREFIX} slot-beat-failed slot={slot_id} failures={failures} error={text(message)}"


def slot_reconnect(slot_id: str, failures: int) -> str:
    """WARNING (added), the heartbeat drops and recreates its connection."""
    return f"{PREFIX} slot-reconnect slot={slot_id} failures={failures}"


def slot_beat_recovered(slot_id: str, failures: int) -> str:
    """INFO (added), a beat landed after failures."""
    return f"{PREFIX} slot-beat-recovered slot={slot_id} after={failures}"


def slot_heartbeat_restart(slot_id: str, message: object) -> str:
    """ERROR (added), the heartbeat's loop crashed (a bug) and starts again."""
    return f"{PREFIX} slot-heartbeat-restart slot={slot_id} error={text(message)}"
