"""`substrate-db migrate`: apply pending migrations, or show their status."""

from __future__ import annotations

import click

from ._common import (
    ConnectionArgs,
    connection_options,
    fmt_time,
    json_option,
    open_client,
    print_json,
    resolve_target,
    table,
)


@click.command()
@connection_options
@click.option("--status", is_flag=True, help="Show every migration and whether it was applied.")
@json_option
@click.pass_context
def migrate(
    ctx: click.Context,
    conn: ConnectionArgs,
    status: bool,
    as_json: bool,
) -> None:
    """Apply pending migrations (safe to run from several processes at once).

    JSON: {"applied": [versions]}; with --status, an array of
    {"version", "name", "applied_at"} (applied_at null while pending).
    """
    target = resolve_target(ctx, conn)
    with open_client(target) as client:
        if status:
            rows = client.migration_status()
            if as_json:
                print_json([r.model_dump(mode="json") for r in rows])
            else:
                click.echo(
                    table(
                        ["VERSION", "NAME", "APPLIED_AT"],
                        [
                            (
                                f"{r.version:04d}",
                                r.name,
                                fmt_time(r.applied_at) if r.applied_at else "pending",
                            )
                            for r in rows
                        ],
                    )
                )
            return
        applied = client.migrate()
    if as_json:
        print_json({"applied": applied})
    elif applied:
        click.echo(f"applied {len(applied)} migration(s): {', '.join(f'{v:04d}' for v in applied)}")
    else:
        click.echo("up to date: no migration to apply")


def register(group: click.Group) -> None:
    group.add_command(migrate)
