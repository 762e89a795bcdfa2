"""`substrate-db embedded start|status|stop|url`: the default, long-lived local server."""

from __future__ import annotations

import sys

import click

from .. import embedded as embedded_mod
from ._common import json_option, print_json


def _server() -> embedded_mod.EmbeddedServer:
    return embedded_mod.EmbeddedServer()


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.group("embedded")
def embedded_group() -> None:
    """The embedded PostgreSQL used when no DSN is given.

    It lives in $SUBSTRATE_HOME (default: ~/.local/share/substrate-db, or
    /var/lib/substrate-db as root, where it runs as an unprivileged account), listens on
    a unix socket only, starts on first use and keeps running until `embedded stop`.
    """


@embedded_group.command()
@json_option
def status(as_json: bool) -> None:
    """Whether it runs, and where it lives. Exit 0 when running, 3 when not (as
    `pg_ctl status`). JSON: {"home", "data_dir", "socket_dir", "initialized", "running",
    "pid", "conninfo", "url"}."""
    st = _server().status()
    if as_json:
        print_json(st.as_dict())
    else:
        state = f"running (pid {st.pid})" if st.running else "not running"
        click.echo(f"embedded PostgreSQL: {state}")
        click.echo(f"home:      {st.home}")
        click.echo(f"data dir:  {st.data_dir}" + ("" if st.initialized else " (not created)"))
        click.echo(f"socket:    {st.socket_dir}")
        click.echo(f"url:       {st.url}")
    if not st.running:
        sys.exit(3)


@embedded_group.command()
@json_option
def start(as_json: bool) -> None:
    """Start it (creating it on first use); a no-op when it runs. JSON: the status."""
    server = _server()
    server.ensure_running(progress=_say)
    st = server.status()
    if as_json:
        print_json(st.as_dict())
    else:
        click.echo(f"embedded PostgreSQL running (pid {st.pid}): {st.url}")


@embedded_group.command()
@json_option
def stop(as_json: bool) -> None:
    """Shut it down (fast shutdown: open sessions are disconnected). JSON:
    {"stopped": bool} (false when it was not running)."""
    stopped = _server().stop()
    if as_json:
        print_json({"stopped": stopped})
    else:
        click.echo(
            "embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running"
        )


@embedded_group.command()
@json_option
def url(as_json: bool) -> None:
    """Print its connection URL (starting it if needed), e.g. for psql "$(substrate-db
    embedded url)". JSON: {"url", "conninfo"}."""
    server = _server()
    server.ensure_running(progress=_say)
    if as_json:
        print_json({"url": server.url, "conninfo": server.conninfo})
    else:
        click.echo(server.url)


def register(group: click.Group) -> None:
    group.add_command(embedded_group)
