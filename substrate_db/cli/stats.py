"""`substrate-db stats`: counts by kind and state, backlog age, expired leases."""

from __future__ import annotations

import sys

import click

from .. import ops
from ..models import JobState
from ._common import (
    ConnectionArgs,
    GracefulStop,
    connection_options,
    fmt_time,
    json_option,
    open_client,
    print_json,
    queries,
    resolve_target,
    table,
)

_STATES = [s.value for s in JobState]


def _age(secs: float | None) -> str:
    if secs is None:
        return "-"
    if secs < 120:
        return f"{secs:.1f}s"
    if secs < 7200:
        return f"{secs / 60:.1f}m"
    return f"{secs / 3600:.1f}h"


def render(stats: ops.Stats) -> str:
    """The text form: one row per kind, a total row, then the health lines."""
    headers = ["KIND", *(s.upper() for s in _STATES), "OLDEST_DUE"]
    rows: list[list[object]] = [
        [k.kind, *(k.counts.get(s, 0) for s in _STATES), _age(k.oldest_available_age_secs)]
        for k in stats.kinds
    ]
    rows.append(
        ["(all)", *(stats.totals.get(s, 0) for s in _STATES), _age(stats.oldest_available_age_secs)]
    )
    lines = [
        table(headers, rows),
        "",
        f"oldest available job waiting: {_age(stats.oldest_available_age_secs)}",
        f"running jobs with an expired lease: {stats.expired_leases}",
    ]
    if stats.slots:
        slot_rows = [
            (
                s.slot_id,
                s.state.value,
                s.jobs_in_flight,
                f"{s.error_rate:.0%}",
                _age((stats.now - s.last_seen).total_seconds()),
                ",".join(s.kinds),
                s.reason,
            )
            for s in stats.slots
        ]
        lines += [
            "",
            table(
                ["SLOT", "STATE", "IN_FLIGHT", "ERRORS", "SEEN_AGO", "KINDS", "REASON"], slot_rows
            ),
        ]
    lines.append(f"as of {fmt_time(stats.now)} (database clock)")
    return "\n".join(lines)


@click.command()
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C (JSON: one object per line).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    metavar="SECS",
    help="Refresh period for --watch.",
)
@connection_options
@json_option
@click.pass_context
def stats(
    ctx: click.Context,
    watch: bool,
    interval: float,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Job counts by kind and state, the age of the oldest available job, running jobs
    whose lease expired, and the slots (workers, runtimes) seen recently.

    JSON: {"now", "totals": {state: n}, "kinds": [{"kind", "counts": {state: n},
    "oldest_available_age_secs"}], "oldest_available_age_secs", "expired_leases",
    "slots": [{"slot_id", "state", "last_seen", "jobs_in_flight", ...}]}.
    """
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        q = queries(client)

        def once() -> None:
            snapshot = client.run(ops.stats(q))
            if as_json:
                print_json(snapshot.model_dump(mode="json"))
                return
            text = render(snapshot)
            if watch and sys.stdout.isatty():
                click.clear()
            click.echo(text)

        if not watch:
            once()
            return
        with GracefulStop() as stop:
            while True:
                once()
                if stop.sleep(interval):
                    return
                if not as_json and not sys.stdout.isatty():
                    click.echo("")


def register(group: click.Group) -> None:
    group.add_command(stats)
