"""`substrate-db enqueue` and `substrate-db jobs list|show|retry|cancel`."""

from __future__ import annotations

import json
from datetime import datetime

import click

from .. import ops
from ..models import Job, JobState
from ._common import (
    ConnectionArgs,
    Failed,
    UserError,
    connection_options,
    fmt_time,
    json_option,
    open_client,
    parse_json_arg,
    print_json,
    queries,
    resolve_target,
    table,
)

_STATES = [s.value for s in JobState]


def _run_at(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UserError(f"--run-at: not an ISO 8601 timestamp: {value!r}") from None
    if parsed.utcoffset() is None:
        raise UserError(
            f"--run-at: {value!r} has no UTC offset; add one (e.g. {value}Z or {value}+02:00)"
        )
    return parsed


@click.command()
@click.argument("kind")
@click.option("--payload", default=None, metavar="JSON|@FILE", help="The payload (default {}).")
@click.option("--priority", type=int, default=0, show_default=True, help="Lower runs first.")
@click.option("--run-at", default=None, metavar="TIMESTAMP", help="ISO 8601 with an offset.")
@click.option("--max-attempts", type=int, default=5, show_default=True)
@click.option(
    "--dedupe-key", default=None, help="No new job while one with this key is unfinished."
)
@click.option("--source-id", default=None, help="Who enqueues: its outcome goes back there.")
@click.option("--serial-key", default=None, help="Jobs sharing it run one at a time, in order.")
@connection_options
@json_option
@click.pass_context
def enqueue(
    ctx: click.Context,
    kind: str,
    payload: str | None,
    priority: int,
    run_at: str | None,
    max_attempts: int,
    dedupe_key: str | None,
    source_id: str | None,
    serial_key: str | None,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Enqueue one job of KIND; print its id.

    With --dedupe-key, while a job holding the key is available or running, that job's id
    is printed and nothing is inserted. JSON: {"id": N}.
    """
    value = None if payload is None else parse_json_arg("--payload", payload)
    when = _run_at(run_at)
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        job_id = client.enqueue(
            kind,
            value,
            priority=priority,
            run_at=when,
            max_attempts=max_attempts,
            dedupe_key=dedupe_key,
            source_id=source_id,
            serial_key=serial_key,
        )
    if as_json:
        print_json({"id": job_id})
    else:
        click.echo(job_id)


@click.group()
def jobs() -> None:
    """List, inspect, retry and cancel jobs."""


@jobs.command("list")
@click.option("--state", type=click.Choice(_STATES), default=None)
@click.option("--kind", default=None)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@connection_options
@json_option
@click.pass_context
def list_jobs(
    ctx: click.Context,
    state: str | None,
    kind: str | None,
    limit: int,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Jobs, newest first. JSON: an array of job objects (every column of the table)."""
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        found = client.list_jobs(kind=kind, state=state, limit=limit)
    if as_json:
        print_json([j.model_dump(mode="json") for j in found])
        return
    click.echo(
        table(
            ["ID", "KIND", "STATE", "PRIO", "ATTEMPTS", "RUN_AT", "CLAIMED_BY"],
            [
                (
                    j.id,
                    j.kind,
                    j.state.value,
                    j.priority,
                    f"{j.attempts}/{j.max_attempts}",
                    fmt_time(j.run_at),
                    j.claimed_by,
                )
                for j in found
            ],
        )
    )


def _show(job: Job, as_json: bool) -> None:
    if as_json:
        print_json(job.model_dump(mode="json"))
        return
    for key, value in job.model_dump(mode="json").items():
        shown = json.dumps(value) if isinstance(value, dict | list) else value
        click.echo(f"{key + ':':<18}{'-' if shown is None else shown}")


@jobs.command("show")
@click.argument("job_id", type=click.IntRange(min=1), metavar="ID")
@connection_options
@json_option
@click.pass_context
def show(
    ctx: click.Context,
    job_id: int,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """One job, every column. JSON: the job object. Exit 1 when there is no such job."""
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        job = client.get_job(job_id)
    if job is None:
        raise Failed(f"job {job_id} not found")
    _show(job, as_json)


@jobs.command("retry")
@click.argument("job_id", type=click.IntRange(min=1), metavar="ID")
@connection_options
@json_option
@click.pass_context
def retry(
    ctx: click.Context,
    job_id: int,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Make a failed or cancelled job available again, due now.

    A job whose attempts are spent gets one more. Running and completed jobs are refused
    (exit 1). JSON: the job object after the retry.
    """
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        outcome = client.run(ops.retry_job(queries(client), job_id))
    if outcome.job is None:
        raise Failed(f"job {job_id} not found")
    if not outcome.ok:
        raise Failed(
            f"job {job_id} is {outcome.job.state.value}: only failed, cancelled or available "
            "jobs can be retried"
        )
    if as_json:
        print_json(outcome.job.model_dump(mode="json"))
    else:
        click.echo(
            f"job {job_id} is available again (attempt {outcome.job.attempts + 1} "
            f"of {outcome.job.max_attempts})"
        )


@jobs.command("cancel")
@click.argument("job_id", type=click.IntRange(min=1), metavar="ID")
@connection_options
@json_option
@click.pass_context
def cancel(
    ctx: click.Context,
    job_id: int,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Cancel a job that has not finished. A running job's executor learns it at its next
    write-back or heartbeat. Exit 1 when the job is finished or missing. JSON: the job."""
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        cancelled = client.cancel_job(job_id)
        job = client.get_job(job_id)
    if job is None:
        raise Failed(f"job {job_id} not found")
    if not cancelled:
        raise Failed(
            f"job {job_id} is already {job.state.value}: only available or running "
            "jobs can be cancelled"
        )
    if as_json:
        print_json(job.model_dump(mode="json"))
    else:
        click.echo(f"job {job_id} cancelled")


def register(group: click.Group) -> None:
    group.add_command(enqueue)
    group.add_command(jobs)
