"""`substrate-db recover-leases` and `substrate-db prune`: the maintenance services."""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from .. import ops
from ..errors import DatabaseError
from ..models import RecoveryResult
from ._common import (
    ConnectionArgs,
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
)


def recovery_document(result: RecoveryResult | None) -> dict[str, Any]:
    """One pass as JSON; a pass that found another owner working is `standing_by`."""
    r = result or RecoveryResult()
    return {
        "released": r.released,
        "requeued": r.requeued,
        "failed": r.failed,
        "requeued_ids": list(r.requeued_ids),
        "failed_ids": list(r.failed_ids),
        "standing_by": result is None,
    }


def recovery_line(result: RecoveryResult | None) -> str:
    """One pass as one line; the counts are always there, the ids when there are any."""
    r = result or RecoveryResult()
    line = f"released={r.released} requeued={r.requeued} failed={r.failed}"
    if r.requeued_ids:
        line += " requeued_ids=" + ",".join(map(str, r.requeued_ids))
    if r.failed_ids:
        line += " failed_ids=" + ",".join(map(str, r.failed_ids))
    if result is None:
        line += " standing-by: another lease-recovery owner holds the lock"
    return line


@click.command("recover-leases")
@every_option("Run a pass every SECS until SIGTERM/SIGINT, then finish the pass and exit 0.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Release at most this many jobs per pass (default: all).",
)
@connection_options
@json_option
@click.pass_context
def recover_leases(
    ctx: click.Context,
    every: float | None,
    limit: int | None,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Release running jobs whose lease expired: back to available, or failed when their
    attempts are spent. One owner works at a time (a transaction-scoped advisory lock,
    PgBouncer-safe); another one stands by.

    Prints one line per pass, `released=N requeued=N failed=N`, also when all are 0.
    JSON: one object per pass (one per line with --every): {"released", "requeued",
    "failed", "requeued_ids", "failed_ids", "standing_by"}.
    """
    target = resolve_target(ctx, conn)
    with open_client(target, service=every is not None) as client:

        def one_pass() -> None:
            try:
                result = client.release_expired_leases_exclusive(limit)
            except DatabaseError as exc:
                if every is None:
                    raise
                # A service keeps going: the next pass may find the database back.
                log.error("[substrate] lease-recovery error=%s", one_line(exc))
                return
            if as_json:
                print_json(recovery_document(result))
            else:
                click.echo(recovery_line(result))

        loop(every, one_pass)


# ASCII digits only: str.isdigit() and \d also accept digits such as '²' that int() refuses.
_DURATION = re.compile(r"(\d+)([smhdw])", re.ASCII)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Duration(click.ParamType):  # type: ignore[type-arg]
    """`90`, `45s`, `30m`, `12h`, `7d`, `2w`, or combined: `1d12h`. In seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text.isascii() and text.isdigit():
            return int(text)
        pos, total = 0, 0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            total += int(match[1]) * _UNIT[match[2]]
            pos = match.end()
        if pos != len(text) or not text:
            self.fail(
                f"{value!r} is not a duration: use e.g. 3600, 45s, 30m, 12h, 7d, 2w or 1d12h",
                param,
                ctx,
            )
        return total


@click.command()
@click.option(
    "--older-than",
    type=Duration(),
    required=True,
    metavar="DURATION",
    help="Prune jobs that finished longer ago than this (e.g. 7d, 12h, 3600).",
)
@click.option(
    "--state",
    "states",
    default="completed,failed,cancelled",
    show_default=True,
    metavar="LIST",
    help="Comma-separated finished states to prune.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=ops.PRUNE_BATCH,
    show_default=True,
    help="Rows per statement (each its own short transaction).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be pruned; delete nothing.")
@connection_options
@json_option
@click.pass_context
def prune(
    ctx: click.Context,
    older_than: int,
    states: str,
    batch_size: int,
    dry_run: bool,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Delete finished jobs older than a duration, in bounded batches (no long locks, no
    huge transaction). Shows a progress bar on stderr when it is a terminal.

    JSON: {"deleted", "cutoff", "states", "dry_run"}.
    """
    wanted = [s.strip() for s in states.split(",") if s.strip()]
    try:
        checked = ops.check_prune_states(wanted)
    except ValueError as exc:
        raise click.BadParameter(one_line(exc), param_hint="--state") from None
    target = resolve_target(ctx, conn)
    show_bar = not dry_run and sys.stderr.isatty()
    with open_client(target) as client:
        bar: Any = None
        shown = 0

        def progress(done: int, total: int) -> None:
            nonlocal bar, shown
            if bar is None:
                bar = click.progressbar(length=max(total, 1), label="pruning", file=sys.stderr)
                bar.__enter__()
            bar.length = max(total, 1)
            bar.update(done - shown)
            shown = done

        try:
            result = client.run(
                ops.prune(
                    queries(client),
                    older_than,
                    checked,
                    batch_size=batch_size,
                    dry_run=dry_run,
                    progress=progress if show_bar else None,
                )
            )
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    if as_json:
        print_json(result.model_dump(mode="json"))
        return
    verb = "would prune" if dry_run else "pruned"
    click.echo(
        f"{verb} {result.deleted} job(s) in {','.join(result.states)} "
        f"finished before {fmt_time(result.cutoff)}"
    )


def register(group: click.Group) -> None:
    group.add_command(recover_leases)
    group.add_command(prune)
