"""`substrate-db worker`: the ready worker (see `substrate_db.worker`)."""

from __future__ import annotations

import click

from .. import worker as worker_mod
from ._common import (
    ConnectionArgs,
    UserError,
    connection_options,
    json_option,
    one_line,
    preflight,
    print_json,
    resolve_target,
)


@click.command()
@click.option("--kinds", required=True, metavar="A,B", help="Comma-separated job kinds to claim.")
@click.option(
    "--handler",
    "handler_spec",
    required=True,
    metavar="MODULE:FUNCTION",
    help="Called with each ClaimedJob; a function (run in a thread) or a coroutine "
    "function. Its return value is the result; what it raises fails the job.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 100_000),
    default=worker_mod.DEFAULT_CONCURRENCY,
    show_default=True,
    help="Most jobs held at once (and threads, for a plain function).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=worker_mod.DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Most jobs per claim and per write-back statement.",
)
@click.option(
    "--lease-secs",
    type=click.IntRange(3, 2**31 - 1),
    default=worker_mod.DEFAULT_LEASE_SECS,
    show_default=True,
    help="Lease per claim, extended every third of it while the job runs.",
)
@click.option(
    "--grace",
    "grace_secs",
    type=click.FloatRange(min=0),
    default=worker_mod.DEFAULT_GRACE_SECS,
    show_default=True,
    metavar="SECS",
    help="On SIGTERM/SIGINT, how long running jobs may finish before release.",
)
@click.option("--slot-id", default="", help="Name in jobs.claimed_by [default: HOST:PID].")
@click.option(
    "--burst",
    is_flag=True,
    help="Exit once no job is claimable and none is running (drain, then stop).",
)
@connection_options
@json_option
@click.pass_context
def worker(
    ctx: click.Context,
    kinds: str,
    handler_spec: str,
    concurrency: int,
    batch_size: int,
    lease_secs: int,
    grace_secs: float,
    slot_id: str,
    burst: bool,
    conn: ConnectionArgs,
    as_json: bool,
) -> None:
    """Claim jobs of KINDS and run HANDLER on each until SIGTERM/SIGINT.

    Claims in batches, heartbeats leases, writes outcomes back in groups. Idle, it waits
    for new jobs (LISTEN, or a 1 s poll behind --pgbouncer). On SIGTERM/SIGINT it stops
    claiming, lets running jobs finish within --grace, releases the rest (retryable, due
    at once), writes back and exits 0; a second signal skips the grace. MODULE is
    imported from the current directory too.

    JSON (on exit): {"slot_id", "claimed", "completed", "failed", "stale", "lost",
    "released", "writeback_errors", "elapsed_secs"}.
    """
    kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
    if not kind_list:
        raise click.BadParameter("give at least one kind", param_hint="--kinds")
    try:
        handler = worker_mod.load_handler(handler_spec)
    except ValueError as exc:
        raise UserError(f"--handler: {one_line(exc)}") from None
    options = worker_mod.WorkerOptions(
        kinds=kind_list,
        concurrency=concurrency,
        batch_size=batch_size,
        lease_secs=lease_secs,
        grace_secs=grace_secs,
        slot_id=slot_id,
        burst=burst,
    )
    target = resolve_target(ctx, conn)
    preflight(target, service=True)

    def ready(w: worker_mod.Worker) -> None:
        mode = "polling (pgbouncer)" if not w.options.listen else "listening"
        click.echo(
            f"worker {w.slot_id}: kinds={','.join(w.options.kinds)} "
            f"concurrency={w.options.concurrency} handler={handler_spec} {mode}",
            err=True,
        )

    stats = worker_mod.run_worker(
        target.conninfo,
        handler,
        options,
        schema=target.schema,
        pgbouncer=target.pgbouncer,
        connect_kwargs=target.kwargs_factory or target.kwargs or None,
        on_ready=ready,
    )
    summary = stats.as_dict()
    if as_json:
        print_json(summary)
    else:
        click.echo("worker stopped: " + " ".join(f"{k}={v}" for k, v in summary.items()), err=True)


def register(group: click.Group) -> None:
    group.add_command(worker)
