"""`substrate-db results` and `substrate-db slots`: what agent runtimes see of each other.

`results` delivers the outcomes of a source's finished jobs (each outcome once, even with
several consumers); `slots` lists the runtime slots and their liveness.
"""

from __future__ import annotations

import click

from ..models import JobOutcome
from ._common import (
    ConnectionArgs,
    GracefulStop,
    connection_options,
    fmt_time,
    json_option,
    open_client,
    print_json,
    resolve_target,
    table,
)


@click.command()
@click.option(
    "--source", "source_id", required=True, metavar="ID", help="The enqueuer's source id."
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many."
)
@click.option(
    "--follow",
    is_flag=True,
    help="Keep delivering new outcomes until SIGTERM/SIGINT (JSON: one object per line).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    metavar="SECS",
    help="How often --follow looks for new outcomes.",
)
@connection_options
@json_option
@click.pass_context
def results(
    ctx: click.Context,
    source_id: str,
    limit: int,
    follow: bool,
    interval: float,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Deliver the outcomes of finished jobs enqueued by --source that were not delivered
    yet, oldest first. Delivered outcomes are not shown again.

    JSON: an array of {"job_id", "kind", "state", "result", "last_error", "attempts",
    "finished_at", "source_id", "delivered_at"}; with --follow, one such object per line.
    """
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        if not follow:
            outcomes = client.fetch_results(source_id, limit=limit)
            if as_json:
                print_json([o.model_dump(mode="json") for o in outcomes])
                return
            rows = [
                (o.job_id, o.kind, o.state.value, fmt_time(o.finished_at), _brief(o))
                for o in outcomes
            ]
            click.echo(table(["JOB", "KIND", "STATE", "FINISHED", "RESULT/ERROR"], rows))
            return
        with GracefulStop() as stop:
            while True:
                for o in client.fetch_results(source_id, limit=limit):
                    if as_json:
                        print_json(o.model_dump(mode="json"))
                    else:
                        click.echo(
                            f"{o.job_id} {o.kind} {o.state.value} {fmt_time(o.finished_at)} "
                            f"{_brief(o)}"
                        )
                if stop.sleep(interval):
                    return


def _brief(outcome: JobOutcome) -> str:
    """The result of a completed job, else its error, cut for one table row."""
    text = outcome.last_error if outcome.state.value != "completed" else outcome.result
    shown = "" if text is None else str(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


@click.command()
@connection_options
@json_option
@click.pass_context
def slots(
    ctx: click.Context,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """The runtime slots and their liveness: healthy, wedged, draining, gone, or stale
    (not seen for three of its beat intervals).

    JSON: an array of {"slot_id", "state", "reported_state", "reason", "kinds", "host",
    "pid", "started_at", "last_seen", "interval_secs", "jobs_in_flight", "current_job",
    "error_rate", "beats"}.
    """
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        found = client.list_slots()
    if as_json:
        print_json([s.model_dump(mode="json") for s in found])
        return
    rows = [
        (
            s.slot_id,
            s.state.value,
            s.reason or "",
            s.jobs_in_flight,
            f"{s.error_rate:.0%}",
            fmt_time(s.last_seen),
            f"{s.host}:{s.pid}",
            ",".join(s.kinds),
        )
        for s in found
    ]
    click.echo(
        table(
            ["SLOT", "STATE", "REASON", "IN_FLIGHT", "ERRORS", "LAST_SEEN", "PROCESS", "KINDS"],
            rows,
        )
    )


def register(group: click.Group) -> None:
    group.add_command(results)
    group.add_command(slots)
