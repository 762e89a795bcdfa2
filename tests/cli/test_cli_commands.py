"""Every command, in-process and as a process: output, `--json`, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from substrate_db import JobState, Substrate

from ._support import Run

JOB_COLUMNS = {
    "id", "kind", "payload", "state", "priority", "run_at", "attempts", "max_attempts",
    "claim_epoch", "claimed_by", "lease_expires_at", "dedupe_key", "result", "last_error",
    "created_at", "updated_at", "finished_at",
}  # fmt: skip


def _table_columns(substrate: Substrate) -> set[str]:
    with substrate.pool.connection() as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'substrate' AND table_name = 'jobs'"
        ).fetchall()
    return {r[0] for r in rows}


def test_job_commands(run: Run, substrate_dsn: str, substrate: Substrate, tmp_path: Path) -> None:
    d = ("--dsn", substrate_dsn)

    ran = run(*d, "migrate", "--json")
    assert (ran.code, ran.json()) == (0, {"applied": []})
    status = run("migrate", "--status", "--json", *d).json()  # --dsn on the command too
    assert status and all(m["applied_at"] is not None for m in status)

    payload = tmp_path / "p.json"
    payload.write_text('{"to": "ada"}')
    first = run(*d, "enqueue", "email", "--payload", f"@{payload}", "--priority", "-3", "--json")
    assert first.code == 0, first.err
    job_id = first.json()["id"]
    second = run(*d, "enqueue", "email", "--payload", '{"n": 2}', "--dedupe-key", "k")
    assert second.code == 0 and second.out.strip().isdigit()
    again = run(*d, "enqueue", "email", "--dedupe-key", "k", "--json").json()
    assert again["id"] == int(second.out)

    listed = run(*d, "jobs", "list", "--json")
    assert listed.code == 0
    jobs = listed.json()
    assert [j["id"] for j in jobs] == [int(second.out), job_id]  # newest first
    assert set(jobs[0]) == _table_columns(substrate) >= JOB_COLUMNS
    assert run(*d, "jobs", "list", "--state", "running", "--json").json() == []
    text = run(*d, "jobs", "list", "--kind", "email")
    assert text.code == 0 and "email" in text.out and "available" in text.out

    shown = run(*d, "jobs", "show", str(job_id), "--json").json()
    assert shown["payload"] == {"to": "ada"} and shown["priority"] == -3
    assert "payload:" in run(*d, "jobs", "show", str(job_id)).out

    cancelled = run(*d, "jobs", "cancel", str(job_id), "--json")
    assert cancelled.code == 0 and cancelled.json()["state"] == "cancelled"
    twice = run(*d, "jobs", "cancel", str(job_id))
    assert twice.code == 1 and "already cancelled" in twice.err
    retried = run(*d, "jobs", "retry", str(job_id), "--json")
    assert retried.code == 0 and retried.json()["state"] == "available"

    claimed = substrate.claim_next_job("s", ["email"])
    assert claimed is not None and claimed.id == job_id
    refused = run(*d, "jobs", "retry", str(job_id))
    assert refused.code == 1 and "running" in refused.err and "Traceback" not in refused.err
    missing = run(*d, "jobs", "show", "999999")
    assert missing.code == 1 and "not found" in missing.err


def test_retry_gives_a_spent_job_one_more_attempt(
    run: Run, substrate_dsn: str, substrate: Substrate
) -> None:
    job_id = substrate.enqueue("x", max_attempts=1)
    job = substrate.claim_next_job("s", ["x"])
    assert job is not None
    assert substrate.fail_job(job.id, job.claim_epoch, "nope").state == JobState.FAILED
    out = run("--dsn", substrate_dsn, "jobs", "retry", str(job_id), "--json").json()
    assert (out["state"], out["attempts"], out["max_attempts"]) == ("available", 1, 2)
    assert out["finished_at"] is None and out["last_error"] == "nope"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue"], "Missing argument"),
        (["enqueue", "k", "--payload", "{bad"], "not valid JSON"),
        (["enqueue", "k", "--payload", "@/nonexistent/p.json"], "cannot read"),
        (["enqueue", "k", "--priority", "40000"], "priority"),
        (["enqueue", "k", "--max-attempts", "0"], "max_attempts"),
        (["enqueue", "k", "--run-at", "2030-01-01T00:00:00"], "no UTC offset"),
        (["enqueue", "k", "--run-at", "tomorrow"], "not an ISO 8601"),
        (["jobs", "list", "--state", "bogus"], "bogus"),
        (["jobs", "show", "abc"], "abc"),
        (["prune", "--older-than", "7x"], "not a duration"),
        (["prune", "--older-than", "7d", "--state", "running"], "finished state"),
        (["schedule-create", "--file", "/nonexistent.schedule.json"], "cannot read"),
        (["worker", "--kinds", "a", "--handler", "no_such_module:f"], "no_such_module"),
        (["worker", "--kinds", "a", "--handler", "nocolon"], "module:function"),
        (["recover-leases", "--every", "0"], "--every"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_user_errors_exit_2(run: Run, substrate_dsn: str, args: list[str], message: str) -> None:
    ran = run("--dsn", substrate_dsn, *args)
    assert ran.code == 2, (ran.out, ran.err)
    assert message in ran.err
    assert "Traceback" not in ran.err and ran.out == ""
    assert len(ran.err.strip().splitlines()) <= 4  # short: the error, maybe click's usage


def test_a_malformed_dsn_is_not_echoed(run: Run) -> None:
    ran = run("--dsn", "host=db password hunter2", "stats")
    assert ran.code == 2 and "hunter2" not in ran.err + ran.out and "Traceback" not in ran.err


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_database_errors_exit_1_in_one_line(run: Run, tmp_path: Path, json_flag: list[str]) -> None:
    ran = run("--dsn", f"host={tmp_path} port=1 user=nobody password=hunter2", "stats", *json_flag)
    assert ran.code == 1
    assert ran.out == "" and "Traceback" not in ran.err and "hunter2" not in ran.err
    assert len(ran.err.strip().splitlines()) == 1 and "cannot connect" in ran.err


def test_unmigrated_database_says_to_migrate(run: Run, substrate_dsn: str) -> None:
    ran = run("--dsn", substrate_dsn, "--schema", "elsewhere", "jobs", "list")
    assert ran.code == 1 and "migrate" in ran.err and "Traceback" not in ran.err
    assert len(ran.err.strip().splitlines()) == 1


def test_dsn_from_environment_and_command_override(run_inproc: Run, substrate_dsn: str) -> None:
    ok = run_inproc("jobs", "list", "--json", env={"SUBSTRATE_DSN": substrate_dsn})
    assert (ok.code, ok.json()) == (0, [])
    # The command's --dsn beats the group's and the environment.
    bad = run_inproc("--dsn", "host=/nonexistent", "jobs", "list", "--dsn", substrate_dsn, "--json")
    assert bad.code == 0
    both = run_inproc("jobs", "list", "--dsn", substrate_dsn, "--config", "x.json")
    assert both.code == 2 and "not both" in both.err


def test_help_everywhere(run_inproc: Run) -> None:
    for args in (
        [], ["jobs"], ["schedule"], ["embedded"], ["worker"], ["recover-leases"], ["prune"],
        ["stats"], ["enqueue"], ["migrate"], ["schedule-tick"], ["schedule-create"],
    ):  # fmt: skip
        ran = run_inproc(*args, "--help")
        assert ran.code == 0 and "Usage:" in ran.out, args


def test_version(run_inproc: Run) -> None:
    ran = run_inproc("--version")
    assert ran.code == 0 and "substrate-db" in ran.out


def test_json_is_one_document(run: Run, substrate_dsn: str) -> None:
    # Logs and notices go to stderr; stdout is exactly the document.
    ran = run("-vv", "--dsn", substrate_dsn, "stats", "--json")
    assert ran.code == 0
    doc = json.loads(ran.out)
    assert set(doc) == {
        "now", "totals", "kinds", "oldest_available_age_secs", "expired_leases", "slots",
    }  # fmt: skip


def _host_config(tmp_path: Path, dsn: str, **extra: object) -> Path:
    params = conninfo_to_dict(dsn)
    block = {
        "enabled": True,
        "credential": "cli-test",
        "kinds": ["x"],
        "slotId": "cli",
        "host": params["host"],
        "port": int(str(params.get("port", 5432))),
        "database": params["dbname"],
        "user": params["user"],
        **extra,
    }
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"name": "runtime", "substrate": block}))
    return path


def test_config_file_connects_with_its_credential(
    run: Run, substrate_dsn: str, substrate: Substrate, tmp_path: Path
) -> None:
    secret = {"SUBSTRATE_CREDENTIAL_CLI_TEST": "s3cret-value"}
    substrate.enqueue("x")
    config = _host_config(tmp_path, substrate_dsn)
    ran = run("--config", str(config), "jobs", "list", "--json", env=secret)
    assert ran.code == 0, ran.err
    assert [j["kind"] for j in ran.json()] == ["x"]
    on_command = run("stats", "--config", str(config), "--json", env=secret)
    assert on_command.code == 0 and on_command.json()["totals"]["available"] == 1

    unreachable = _host_config(tmp_path, substrate_dsn, host=str(tmp_path), port=1)
    bad = run("--config", str(unreachable), "jobs", "list", env=secret)
    assert bad.code == 1 and "s3cret-value" not in bad.err + bad.out
    assert "Traceback" not in bad.err

    no_host = tmp_path / "nohost.json"
    no_host.write_text(json.dumps({"substrate": {"enabled": False}}))
    ran = run("--config", str(no_host), "jobs", "list")
    assert ran.code == 2 and "no host" in ran.err
    missing = run("--config", str(tmp_path / "nope.json"), "jobs", "list")
    assert missing.code == 2 and "no such file" in missing.err
