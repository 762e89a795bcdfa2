"""Credential resolvers and `Secret`: lookups, refusals, and no secret in any text."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from substrate_db.intake import (
    ChainResolver,
    CredentialError,
    EnvCredentialResolver,
    FileCredentialResolver,
    LibpqPassfileResolver,
    Secret,
    default_resolver,
    env_var_name,
)
from substrate_db.intake.credentials import resolve

PASSWORD = "Tr0ub4dor&3-credential"


def test_secret_never_shows_itself() -> None:
    secret = Secret(PASSWORD)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{[secret]}"):
        assert PASSWORD not in text
    assert secret.reveal() == PASSWORD
    assert secret == Secret(PASSWORD) and secret != Secret("other")
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_env_var_name_upper_cases_and_replaces() -> None:
    assert env_var_name("prod-db.main") == "SUBSTRATE_CREDENTIAL_PROD_DB_MAIN"
    assert env_var_name("slot_7") == "SUBSTRATE_CREDENTIAL_SLOT_7"


def test_env_resolver() -> None:
    resolver = EnvCredentialResolver({"SUBSTRATE_CREDENTIAL_PROD_DB": PASSWORD})
    found = resolver("prod-db")
    assert isinstance(found, Secret) and found.reveal() == PASSWORD
    assert resolver("other") is None
    with pytest.raises(CredentialError, match="SUBSTRATE_CREDENTIAL_EMPTY is set but empty"):
        EnvCredentialResolver({"SUBSTRATE_CREDENTIAL_EMPTY": ""})("empty")


def test_file_resolver_reads_a_private_file(tmp_path: Path) -> None:
    (tmp_path / "prod-db").write_text(PASSWORD + "\n")
    (tmp_path / "prod-db").chmod(0o600)
    found = FileCredentialResolver(tmp_path)("prod-db")
    assert found is not None and found.reveal() == PASSWORD
    assert FileCredentialResolver(tmp_path)("missing") is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_file_resolver_refuses_files_others_can_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "prod-db"
    path.write_text(PASSWORD)
    path.chmod(mode)
    with pytest.raises(CredentialError) as info:
        FileCredentialResolver(tmp_path)("prod-db")
    assert f"mode {mode:04o}" in str(info.value) and "chmod 600" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_file_resolver_refuses_empty_files_and_path_tricks(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "empty").chmod(0o600)
    with pytest.raises(CredentialError, match="is empty"):
        FileCredentialResolver(tmp_path)("empty")
    with pytest.raises(CredentialError, match="cannot name a file"):
        FileCredentialResolver(tmp_path)("../etc/passwd")


def test_file_resolver_default_directory_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUBSTRATE_CREDENTIALS_DIR", str(tmp_path))
    assert FileCredentialResolver().directory == tmp_path


def test_default_chain_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBSTRATE_CREDENTIALS_DIR", str(tmp_path))
    monkeypatch.delenv("SUBSTRATE_CREDENTIAL_SLOT", raising=False)
    chain = default_resolver()
    assert [type(r) for r in chain.resolvers] == [
        EnvCredentialResolver,
        FileCredentialResolver,
        LibpqPassfileResolver,
    ]
    assert chain("slot") is None  # nothing found: libpq's passfile decides
    (tmp_path / "slot").write_text("from-file")
    (tmp_path / "slot").chmod(0o600)
    assert resolve(chain, "slot") == Secret("from-file")
    monkeypatch.setenv("SUBSTRATE_CREDENTIAL_SLOT", "from-env")
    assert resolve(chain, "slot") == Secret("from-env")


def test_a_refusal_stops_the_chain(tmp_path: Path) -> None:
    (tmp_path / "slot").write_text("x")
    (tmp_path / "slot").chmod(0o644)
    chain = ChainResolver([FileCredentialResolver(tmp_path), lambda _id: "fallback"])
    with pytest.raises(CredentialError):
        chain("slot")


def test_resolve_wraps_resolver_failures_and_bad_answers() -> None:
    def broken(credential_id: str) -> str:
        raise KeyError(credential_id)

    with pytest.raises(CredentialError, match="the resolver failed: KeyError") as info:
        resolve(broken, "slot")
    assert info.value.__cause__ is None and info.value.__context__ is None
    with pytest.raises(CredentialError, match="got: int"):
        resolve(lambda _id: 42, "slot")  # type: ignore[arg-type, return-value]
    assert resolve(lambda _id: PASSWORD, "slot") == Secret(PASSWORD)
    assert resolve(lambda _id: None, "slot") is None


def test_resolver_reprs_hold_no_secret() -> None:
    resolver = EnvCredentialResolver({"SUBSTRATE_CREDENTIAL_X": PASSWORD})
    assert PASSWORD not in repr(resolver) and PASSWORD not in repr(default_resolver())
