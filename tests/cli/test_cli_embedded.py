"""The embedded server: started on first use, reused, stopped; durable; private."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
import pytest

from substrate_db.embedded import ROOT_HOME, EmbeddedError, EmbeddedServer, default_home

from ._support import Run


def test_embedded_lifecycle(cli_home: Path, run_inproc: Run, run_proc: Run) -> None:
    status = run_proc("embedded", "status", "--json")
    assert status.code == 3 and status.json()["running"] is False
    assert status.json()["home"] == str(cli_home)

    # First use by a command with no DSN: the server is created and started.
    migrated = run_proc("migrate", "--json")
    assert migrated.code == 0, migrated.err
    assert "first use" in migrated.err
    running = run_proc("embedded", "status", "--json")
    assert running.code == 0
    doc = running.json()
    assert doc["running"] and doc["initialized"] and doc["pid"]

    # Reused: later runs attach to the same postmaster, in-process and as a process.
    enq = run_inproc("enqueue", "hello", "--json")
    assert enq.code == 0 and enq.err == ""
    listed = run_proc("jobs", "list", "--json")
    assert [j["kind"] for j in listed.json()] == ["hello"]
    url = run_proc("embedded", "url")
    assert url.code == 0 and url.out.startswith("postgresql://")
    assert run_inproc("embedded", "status", "--json").json()["pid"] == doc["pid"]
    started = time.perf_counter()
    EmbeddedServer(cli_home).ensure_running()
    attach_secs = time.perf_counter() - started  # reported, not asserted: no timed assertions

    # A real server: durable, unix socket only, owned by an unprivileged account.
    with psycopg.connect(doc["conninfo"]) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                [["fsync", "listen_addresses", "synchronous_commit"]],
            ).fetchall()
        )
    assert settings == {"fsync": "on", "listen_addresses": "", "synchronous_commit": "on"}
    pg_dir = cli_home / "pg"
    assert pg_dir.stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        assert pg_dir.stat().st_uid != 0

    stopped = run_inproc("embedded", "stop", "--json")
    assert (stopped.code, stopped.json()) == (0, {"stopped": True})
    assert run_proc("embedded", "status").code == 3
    assert run_proc("embedded", "stop").out.strip() == "embedded PostgreSQL was not running"

    # Started again on the next use, with the data kept.
    again = run_inproc("jobs", "list", "--json")
    assert again.code == 0 and [j["kind"] for j in again.json()] == ["hello"]
    print(f"attach to a running embedded server: {attach_secs * 1000:.1f} ms")


def test_default_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBSTRATE_HOME", "~/x")
    assert default_home() == Path("~/x").expanduser()
    monkeypatch.delenv("SUBSTRATE_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    expected = ROOT_HOME if os.geteuid() == 0 else Path("/xdg/substrate-db")
    assert default_home() == expected


def test_a_long_home_puts_the_socket_in_tmp(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / ("d" * 120))
    assert server.socket_dir.parent == Path("/tmp")
    assert server.socket_dir.name.startswith(f"substrate-db-{os.geteuid()}-")


@pytest.mark.skipif(os.geteuid() != 0, reason="the unreachable-home check is for root")
def test_root_refuses_a_home_the_server_account_cannot_reach(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(EmbeddedError, match="cannot reach"):
        EmbeddedServer(closed / "home").ensure_running()
