"""Credentials against a server that checks passwords: rotation without a restart,
refusals as `credential-fail`, libpq's passfile, and no password in any text."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

import pytest

from substrate_db import Substrate
from substrate_db.intake import SkipReason, SQLiteTaskQueue, SubstrateIntake
from substrate_db.intake._connect import ConnectSettings, ConnectTracker

from .conftest import INTAKE_ROLE, PasswordServer, lines


class Vault:
    """A resolver whose answers the test controls; it counts the lookups."""

    def __init__(self, *answers: str | None) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, credential_id: str) -> str | None:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def intakes(queue: SQLiteTaskQueue) -> Any:
    made: list[SubstrateIntake] = []

    def make(config: Any, resolver: Any) -> SubstrateIntake:
        intake = SubstrateIntake(config, queue, resolve_credential=resolver)
        made.append(intake)
        return intake

    yield make
    for intake in made:
        intake.close()


def test_the_right_password_connects(
    password_server: PasswordServer, pw_admin: Substrate, intakes: Any, logs: Any
) -> None:
    job_id = pw_admin.enqueue("email", {})
    result = intakes(password_server.config(), Vault("initial-pw")).tick()
    assert result.claimed and result.job_id == job_id


def test_a_password_rotated_between_resolve_and_connect_is_resolved_again(
    password_server: PasswordServer, pw_admin: Substrate, intakes: Any, logs: Any
) -> None:
    password_server.set_password("rotated-pw")
    pw_admin.enqueue("email", {})
    vault = Vault("initial-pw", "rotated-pw")  # stale on the first lookup only

    result = intakes(password_server.config(), vault).tick()

    assert result.claimed and result.skip_reason is None
    assert vault.calls == 2  # resolved again once, after the refusal
    assert lines(logs, logging.WARNING) == []


def test_rotation_needs_no_restart(
    password_server: PasswordServer, pw_admin: Substrate, intakes: Any
) -> None:
    vault = Vault("initial-pw")
    intake = intakes(password_server.config(), vault)
    assert intake.tick().skip_reason is None  # connected with the first password

    password_server.set_password("second-pw")
    vault.answers = ["second-pw"]
    with pw_admin.pool.connection() as conn:  # the server drops the old sessions
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            [INTAKE_ROLE],
        )
    job_id = pw_admin.enqueue("email", {})

    result = intake.tick()  # the pool drops the dead connection and opens a new one

    assert result.claimed and result.job_id == job_id


def test_a_wrong_password_is_credential_fail(
    password_server: PasswordServer, pw_admin: Substrate, intakes: Any, logs: Any
) -> None:
    vault = Vault("WrongPass-123")
    result = intakes(password_server.config(connect_timeout=0.5), vault).tick()
    assert result.skip_reason == SkipReason.CREDENTIAL_FAIL
    [line] = lines(logs, logging.WARNING)
    assert line.startswith("[substrate] skip reason=credential-fail error=connection failed: ")
    assert f'password authentication failed for user "{INTAKE_ROLE}"' in line
    assert vault.calls >= 2  # resolved again and retried


def test_first_tick_without_a_credential_then_provisioned(
    password_server: PasswordServer,
    pw_admin: Substrate,
    queue: SQLiteTaskQueue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    logs: Any,
) -> None:
    # The default chain: no variable, no file, no passfile -> libpq sends no password.
    monkeypatch.delenv("SUBSTRATE_CREDENTIAL_PW_SLOT", raising=False)
    monkeypatch.setenv("SUBSTRATE_CREDENTIALS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    job_id = pw_admin.enqueue("email", {})
    with SubstrateIntake(password_server.config(connect_timeout=0.5), queue) as intake:
        first = intake.tick()
        assert first.skip_reason == SkipReason.CREDENTIAL_FAIL
        assert "no password supplied" in lines(logs, logging.WARNING)[0]

        monkeypatch.setenv("SUBSTRATE_CREDENTIAL_PW_SLOT", "initial-pw")
        second = intake.tick()
        assert second.claimed and second.job_id == job_id


def test_libpq_passfile_ends_the_default_chain(
    password_server: PasswordServer,
    pw_admin: Substrate,
    queue: SQLiteTaskQueue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SUBSTRATE_CREDENTIAL_PW_SLOT", raising=False)
    monkeypatch.setenv("SUBSTRATE_CREDENTIALS_DIR", str(tmp_path / "none"))
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:{password_server.dbname}:{INTAKE_ROLE}:initial-pw\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with SubstrateIntake(password_server.config(), queue) as intake:
        assert intake.tick().skip_reason is None


def test_a_credentials_file(
    password_server: PasswordServer,
    pw_admin: Substrate,
    queue: SQLiteTaskQueue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SUBSTRATE_CREDENTIAL_PW_SLOT", raising=False)
    monkeypatch.setenv("SUBSTRATE_CREDENTIALS_DIR", str(tmp_path))
    (tmp_path / "pw-slot").write_text("initial-pw\n")
    (tmp_path / "pw-slot").chmod(0o600)
    with SubstrateIntake(password_server.config(), queue) as intake:
        assert intake.tick().skip_reason is None


def _chain_texts(exc: BaseException | None) -> list[str]:
    """Everything an exception and its causes could show, the pgconn repr included."""
    texts: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts += [str(exc), repr(exc), repr(getattr(exc, "pgconn", None))]
        texts += traceback.format_exception(exc)
        exc = exc.__cause__ or exc.__context__
    return texts


def test_secrets_never_appear_in_logs_reprs_or_exceptions(
    password_server: PasswordServer,
    pw_admin: Substrate,
    intakes: Any,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    good, wrong = "initial-pw", "Wr0ng-S3cret-pw"
    pw_admin.enqueue("email", {})

    ok = intakes(password_server.config(slot_id="slot-good"), Vault(good))
    bad = intakes(password_server.config(slot_id="slot-bad", connect_timeout=0.5), Vault(wrong))
    assert ok.tick().claimed
    failed = bad.tick()
    assert failed.skip_reason == SkipReason.CREDENTIAL_FAIL

    # What a runtime would see of a failure if it used the client directly.
    with pytest.raises(Exception) as info:
        bad.client().claim_next_job("slot-bad", ["email"])
    settings = ConnectSettings(password_server.config(), Vault(good), ConnectTracker())

    texts = [all_logs.text, *(r.getMessage() for r in all_logs.records)]
    texts += [repr(ok), repr(bad), repr(ok.config), ok.config.model_dump_json(), repr(failed)]
    texts += [repr(settings), repr(ok.client().pool), repr(bad.client().pool)]
    texts += _chain_texts(info.value)
    for text in texts:
        assert good not in text and wrong not in text, text
