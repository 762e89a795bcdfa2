"""`substrate-db schedule list|delete|create|tick`, and the top-level spellings
`schedule-create` and `schedule-tick`."""

from __future__ import annotations

from typing import Any

import click

from .. import schedules
from ..errors import DatabaseError
from ._common import (
    ConnectionArgs,
    Failed,
    connection_options,
    every_option,
    fmt_time,
    json_option,
    log,
    loop,
    one_line,
    open_client,
    print_json,
    queries,
    resolve_target,
    table,
)


def schedule_document(s: schedules.Schedule) -> dict[str, Any]:
    """A schedule as JSON: the schedule file's keys plus its place on the grid."""
    return s.model_dump(mode="json")


@click.command("create")
@click.option(
    "--file",
    "path",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="F.schedule.json",
    help="The schedule file (JSON).",
)
@connection_options
@json_option
@click.pass_context
def create(
    ctx: click.Context,
    path: str,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Create a schedule from a file, or update the one with its name in place.

    The file: {"name", "kind", "payload", "interval_secs"} and optionally "enabled",
    "priority", "max_attempts"; unknown keys are an error. The next run is recomputed from
    the new interval (last run + interval, or now when it never ran). JSON: the schedule
    object with "created" (false when it updated an existing one).
    """
    spec = schedules.ScheduleSpec.from_file(path)  # exit 2 on a bad file, before connecting
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        outcome = client.run(schedules.upsert(queries(client), spec, None))
    if as_json:
        print_json({**schedule_document(outcome.schedule), "created": outcome.created})
        return
    verb = "created" if outcome.created else "updated"
    click.echo(
        f"{verb} schedule {spec.name}: {spec.kind} every {spec.interval_secs}s, "
        f"next run {fmt_time(outcome.schedule.next_run_at)}"
        + ("" if spec.enabled else " (disabled)")
    )


@click.command("list")
@connection_options
@json_option
@click.pass_context
def list_schedules(
    ctx: click.Context,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Every schedule. JSON: an array of objects with the schedule file's keys plus
    next_run_at, last_run_at and last_job_id."""
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        found = client.run(schedules.list_schedules(queries(client)))
    if as_json:
        print_json([schedule_document(s) for s in found])
        return
    click.echo(
        table(
            ["NAME", "KIND", "EVERY", "ENABLED", "NEXT_RUN_AT", "LAST_RUN_AT", "LAST_JOB"],
            [
                (
                    s.name,
                    s.kind,
                    f"{s.interval_secs}s",
                    "yes" if s.enabled else "no",
                    fmt_time(s.next_run_at),
                    fmt_time(s.last_run_at),
                    s.last_job_id,
                )
                for s in found
            ],
        )
    )


@click.command("delete")
@click.argument("name")
@connection_options
@json_option
@click.pass_context
def delete(
    ctx: click.Context,
    name: str,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Delete the schedule NAME (jobs it already enqueued stay). Exit 1 when there is
    none. JSON: {"name", "deleted": true}."""
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        deleted = client.run(schedules.delete(queries(client), name))
    if not deleted:
        raise Failed(f"schedule {name!r} not found")
    if as_json:
        print_json({"name": name, "deleted": True})
    else:
        click.echo(f"deleted schedule {name}")


def tick_document(result: schedules.TickResult) -> dict[str, Any]:
    """A tick as JSON: the runs it enqueued, then every schedule's next run."""
    return {
        "enqueued": [r.model_dump(mode="json", exclude={"next_run_at"}) for r in result.runs],
        "schedules": [
            s.model_dump(mode="json", include={"name", "enabled", "next_run_at"})
            for s in result.schedules
        ],
    }


@click.command("tick")
@every_option("Tick every SECS until SIGTERM/SIGINT, then finish the tick and exit 0.")
@connection_options
@json_option
@click.pass_context
def tick(
    ctx: click.Context,
    every: float | None,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Enqueue every due run once (safe with several tickers at once; missed runs
    coalesce into one), then print each schedule's next run.

    JSON: {"enqueued": [{"name", "kind", "job_id", "due_at", "dedupe_key"}],
    "schedules": [{"name", "enabled", "next_run_at"}]}, one per line with --every.
    """
    target = resolve_target(ctx, conn)
    with open_client(target, service=every is not None) as client:
        q = queries(client)

        def one_pass() -> None:
            try:
                result = client.run(schedules.tick(q))
            except DatabaseError as exc:
                if every is None:
                    raise
                log.error("[substrate] schedule-tick error=%s", one_line(exc))
                return
            if as_json:
                print_json(tick_document(result))
                return
            for run in result.runs:
                job = f"job={run.job_id}" if run.job_id is not None else "job=- (already queued)"
                click.echo(f"enqueued {run.name} {job} due={fmt_time(run.due_at)}")
            for s in result.schedules:
                state = "" if s.enabled else " (disabled)"
                click.echo(f"next {s.name} {fmt_time(s.next_run_at)}{state}")

        loop(every, one_pass)


@click.group("schedule")
def schedule_group() -> None:
    """Recurring schedules: create (upsert), list, delete, tick."""


schedule_group.add_command(create)
schedule_group.add_command(list_schedules)
schedule_group.add_command(delete)
schedule_group.add_command(tick)


def register(group: click.Group) -> None:
    group.add_command(schedule_group)
    group.add_command(create, "schedule-create")
    group.add_command(tick, "schedule-tick")
