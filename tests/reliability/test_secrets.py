"""Secrets never reach logs, reprs, exceptions or `--json` output.

A private server with SCRAM password authentication (so a wrong password is really
refused, unlike the trust-auth test server) and a role with a password. The password
goes in a DSN, through the intake's credential resolver, and through the CLI's
`--dsn`, `SUBSTRATE_DSN` and `--config` + credential environment variable. Every
lifecycle call, a worker run, and the failure paths (wrong password, unreachable server)
run with DEBUG logging captured from every logger. Afterwards neither the right
password nor the wrong one may appear in any log line, exception message or repr
(chained causes included), traceback text, object repr, or CLI output.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo

from substrate_db import ConnectionFailed, Substrate, SubstrateError
from substrate_db.cli import cli
from substrate_db.worker import WorkerOptions, run_worker

from ._servers import ControlledPostgres
from .handlers import echo

SECRET = "Right-Pa55word-7d1f"
WRONG = "Wr0ng-Secret-4c2e"
USER = "app_user"


@pytest.fixture(scope="module")
def scram_server() -> Iterator[ControlledPostgres]:
    server = ControlledPostgres().start()
    try:
        dsn = server.create_database("app")
        hba = server.ephemeral.data_dir / "pg_hba.conf"
        # The superuser keeps trust (the fixture's own access); everyone else must
        # present a password.
        hba.write_text("local all postgres trust\nlocal all all scram-sha-256\n")
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{SECRET}'")
            admin.execute(f"GRANT USAGE ON SCHEMA substrate TO {USER}")
            admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA substrate TO {USER}")
            admin.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA substrate TO {USER}")
            admin.execute("SELECT pg_reload_conf()")
        yield server
    finally:
        server.close()


def dsn_with(server: ControlledPostgres, password: str, *, uri: bool = False) -> str:
    host = str(server.ephemeral.socket_dir)
    if uri:
        return f"postgresql://{USER}:{password}@/app?host={host}&port={server.ephemeral.port}"
    return make_conninfo(server.conninfo_for("app"), user=USER, password=password)


def exception_texts(exc: BaseException) -> str:
    """Everything an exception shows: str and repr of it and of each chained cause and
    context, and the formatted traceback."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(current.args)]
        current = current.__cause__ or current.__context__
    parts += traceback.format_exception(exc)
    return "\n".join(parts)


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text
        assert WRONG not in text


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # every logger: ours, psycopg's, the pool's
    return caplog


@pytest.mark.parametrize("uri", [False, True], ids=["keyvalue", "uri"])
def test_api_lifecycle_with_a_password_logs_no_secret(
    scram_server: ControlledPostgres, all_logs: pytest.LogCaptureFixture, uri: bool
) -> None:
    dsn = dsn_with(scram_server, SECRET, uri=uri)
    with Substrate.connect(dsn, max_size=2) as client:
        job_id = client.enqueue("k", {"x": 1}, source_id="src")
        job = client.claim_next_job("slot", ["k"], lease_secs=30)
        assert job is not None and job.id == job_id
        assert client.complete_job(job.id, job.claim_epoch, {"ok": True}).ok
        assert not client.complete_job(job.id, job.claim_epoch).ok  # a refusal, logged?
        client.release_expired_leases()
        texts = [repr(client), repr(client.pool), str(client.pool.get_stats()), repr(job)]
        client.enqueue_many([{"kind": "w"} for _ in range(3)])
    stats = run_worker(dsn, echo, WorkerOptions(kinds=["w"], burst=True, lease_secs=30))
    assert stats.completed == 3
    assert_clean(all_logs.text, *texts, repr(stats))


@pytest.mark.parametrize("where", ["wrong password", "unreachable server"])
def test_connection_failures_show_no_secret(
    scram_server: ControlledPostgres, all_logs: pytest.LogCaptureFixture, where: str
) -> None:
    if where == "wrong password":
        dsn = dsn_with(scram_server, WRONG)
    else:
        dsn = make_conninfo(dsn_with(scram_server, SECRET), host="/nonexistent-dir")
    with Substrate.connect(dsn, timeout=1, max_size=1) as client:
        with pytest.raises(ConnectionFailed) as caught:
            client.enqueue("k")
        texts = exception_texts(caught.value)
        assert_clean(texts, all_logs.text, repr(client), repr(client.pool))


def test_cli_output_and_errors_show_no_secret(
    scram_server: ControlledPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    good = dsn_with(scram_server, SECRET, uri=True)
    outputs: list[str] = []

    def run(*args: str, code: int = 0, env: dict[str, str] | None = None) -> Any:
        result = runner.invoke(cli, list(args), env=env)
        assert result.exit_code == code, (args, result.output, result.stderr)
        outputs.extend([result.stdout, result.stderr])
        return result

    job = json.loads(run("--dsn", good, "-vv", "enqueue", "k", "--json").stdout)
    run("--dsn", good, "-vv", "jobs", "list", "--json")
    run("--dsn", good, "jobs", "show", str(job["id"]), "--json")
    run("--dsn", good, "stats", "--json")
    run("--dsn", good, "recover-leases", "--json")
    run("--dsn", good, "migrate", "--status", "--json")
    run("-vv", "jobs", "list", "--json", env={"SUBSTRATE_DSN": good})
    # Failures: exit 1, one line, no secret (neither the wrong one nor the right one).
    for bad in (dsn_with(scram_server, WRONG, uri=True), dsn_with(scram_server, WRONG)):
        failed = run("--dsn", bad, "-vv", "jobs", "list", "--json", code=1)
        assert failed.stdout == ""
        assert "password authentication failed" in failed.stderr
    unreachable = make_conninfo(dsn_with(scram_server, SECRET), host="/nonexistent-dir")
    run("--dsn", unreachable, "stats", "--json", code=1)
    assert_clean(*outputs)


def test_cli_config_with_a_credential_shows_no_secret(
    scram_server: ControlledPostgres, tmp_path: Path
) -> None:
    host_config = tmp_path / "host.json"
    block = {
        "enabled": True,
        "credential": "app-db",
        "kinds": ["k"],
        "slotId": "slot-1",
        "host": str(scram_server.ephemeral.socket_dir),
        "port": scram_server.ephemeral.port,
        "database": "app",
        "user": USER,
    }
    host_config.write_text(json.dumps({"substrate": block}))
    runner = CliRunner()
    outputs = []
    for password, code in ((SECRET, 0), (WRONG, 1)):
        env = {"SUBSTRATE_CREDENTIAL_APP_DB": password}
        result = runner.invoke(
            cli, ["--config", str(host_config), "-vv", "jobs", "list", "--json"], env=env
        )
        assert result.exit_code == code, (result.output, result.stderr)
        outputs += [result.stdout, result.stderr]
    assert_clean(*outputs)


def test_intake_shows_no_secret(
    scram_server: ControlledPostgres, all_logs: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from substrate_db.intake import SQLiteTaskQueue, SubstrateConfig, SubstrateIntake

    with Substrate.connect(dsn_with(scram_server, SECRET)) as client:
        client.enqueue("intake.k", {"subject": "s"})
    config = SubstrateConfig(
        enabled=True,
        credential="app-db",
        kinds=["intake.k"],
        slot_id="slot-1",
        host=str(scram_server.ephemeral.socket_dir),
        port=scram_server.ephemeral.port,
        database="app",
        user=USER,
        is_lease_recovery_owner=True,
        connect_timeout=2,
    )
    texts = [repr(config), str(config.model_dump())]
    for password in (WRONG, SECRET):
        queue = SQLiteTaskQueue(tmp_path / f"{password}.db")
        with SubstrateIntake(config, queue, resolve_credential=lambda _, p=password: p) as intake:
            tick = intake.tick()
            texts += [repr(intake), repr(tick)]
            if password == SECRET:
                assert tick.claimed, tick
                task = queue.get_task(tick.local_task_id)  # type: ignore[arg-type]
                assert task is not None
                texts.append(repr(task))
                intake.write_back(task, ok=True, result={"r": 1})
                intake.lease_recovery_tick()
            else:
                assert tick.skip_reason == "credential-fail", tick
    assert_clean(all_logs.text, *texts)


def test_a_substrate_error_never_embeds_the_conninfo(scram_server: ControlledPostgres) -> None:
    """Schema errors on a password-bearing connection: the message names the problem."""
    dsn = dsn_with(scram_server, SECRET)
    with Substrate.connect(dsn, schema="not_migrated", max_size=1) as client:
        with pytest.raises(SubstrateError) as caught:
            client.enqueue("k")
        assert_clean(exception_texts(caught.value))
