"""SubstrateConfig: defaults, required fields when enabled, spellings, errors, loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from substrate_db.intake import SubstrateConfig

ENABLED: dict[str, Any] = {
    "enabled": True,
    "credential": "prod-db",
    "kinds": ["email", "sms"],
    "slot_id": "slot-1",
    "host": "db.internal",
}


def test_default_config_is_valid_and_disabled() -> None:
    config = SubstrateConfig()
    assert config.enabled is False
    assert (config.lease_secs, config.port, config.connect_timeout) == (300, 5432, 5.0)
    assert (config.is_lease_recovery_owner, config.lease_recovery_cadence_secs) == (False, 60)
    assert config.host is None and config.database is None and config.user is None
    assert config.schema_name == "substrate"


def test_enabled_config_with_required_fields() -> None:
    config = SubstrateConfig.model_validate(ENABLED)
    assert config.kinds == ("email", "sms")
    assert config.host == "db.internal" and config.database is None and config.user is None


def test_frozen() -> None:
    config = SubstrateConfig.model_validate(ENABLED)
    with pytest.raises(ValidationError):
        config.lease_secs = 10


@pytest.mark.parametrize("host", [None, "", "   "])
def test_enabled_without_host_is_refused_naming_host(host: str | None) -> None:
    fields = {**ENABLED, "host": host}
    if host is None:
        del fields["host"]
    with pytest.raises(ValidationError) as info:
        SubstrateConfig.model_validate(fields)
    message = str(info.value)
    assert "host (got: " in message
    assert "no default" in message
    shown = "None" if host is None else "''"  # a blank host is stripped to ''
    assert f"host (got: {shown})" in message


@pytest.mark.parametrize("missing", ["credential", "kinds", "slot_id"])
def test_enabled_requires_credential_kinds_slot(missing: str) -> None:
    fields = {k: v for k, v in ENABLED.items() if k != missing}
    with pytest.raises(ValidationError) as info:
        SubstrateConfig.model_validate(fields)
    assert f"{missing} (got: " in str(info.value)


def test_disabled_config_needs_nothing_else() -> None:
    assert SubstrateConfig(enabled=False, kinds=[]).enabled is False  # type: ignore[arg-type]


def test_camel_case_and_snake_case_are_both_accepted() -> None:
    camel = SubstrateConfig.model_validate(
        {
            **{k: v for k, v in ENABLED.items() if k != "slot_id"},
            "slotId": "slot-9",
            "leaseSecs": 90,
            "isLeaseRecoveryOwner": True,
            "leaseRecoveryCadenceSecs": 15,
            "connectTimeout": 1.5,
        }
    )
    snake = SubstrateConfig.model_validate(
        {
            **ENABLED,
            "slot_id": "slot-9",
            "lease_secs": 90,
            "is_lease_recovery_owner": True,
            "lease_recovery_cadence_secs": 15,
            "connect_timeout": 1.5,
        }
    )
    assert camel == snake
    assert camel.slot_id == "slot-9" and camel.lease_secs == 90 and camel.is_lease_recovery_owner


def test_unknown_keys_are_refused_by_name_without_echoing_the_value() -> None:
    with pytest.raises(ValidationError) as info:
        SubstrateConfig.model_validate({**ENABLED, "password": "hunter2-secret"})
    message = str(info.value)
    assert "password" in message and "Extra inputs are not permitted" in message
    assert "hunter2-secret" not in message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("lease_secs", 0, "expected lease_secs to be an integer >= 1, got: 0"),
        ("lease_secs", "300", "expected lease_secs to be an integer >= 1, got: '300'"),
        ("lease_secs", True, "expected lease_secs to be an integer >= 1, got: True"),
        ("port", 70000, "expected port to be an integer from 1 to 65535, got: 70000"),
        ("kinds", "email", "expected kinds to be a non-empty list of job kinds, got: 'email'"),
        ("kinds", [""], "expected kinds[0] to be a non-empty string"),
        ("slot_id", "x" * 201, "expected slot_id to be a non-empty string of at most 200"),
        ("enabled", "yes", "expected enabled to be true or false, got: 'yes'"),
        ("connect_timeout", 0, "expected connect_timeout to be a number of seconds > 0"),
        ("lease_recovery_cadence_secs", -1, "expected lease_recovery_cadence_secs to be"),
        ("schema_name", "bad-name", "expected schema_name to be an identifier"),
    ],
)
def test_errors_name_the_field_and_the_value(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        SubstrateConfig.model_validate({**ENABLED, field: value})
    assert expected in str(info.value)


def test_lease_secs_is_any_integer_from_one() -> None:
    assert SubstrateConfig.model_validate({**ENABLED, "lease_secs": 1}).lease_secs == 1
    big = SubstrateConfig.model_validate({**ENABLED, "lease_secs": 10**6})
    assert big.lease_secs == 10**6


def test_a_bad_credential_id_is_never_echoed() -> None:
    with pytest.raises(ValidationError) as info:
        SubstrateConfig.model_validate({**ENABLED, "credential": "s3cr3t pass/word!"})
    message = str(info.value)
    assert "credential" in message and "never a password" in message
    assert "s3cr3t" not in message


def test_unix_socket_directory_as_host() -> None:
    config = SubstrateConfig.model_validate({**ENABLED, "host": "/var/run/postgresql"})
    assert config.host == "/var/run/postgresql"


def test_from_host_config_reads_the_substrate_block(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    block = {**{k: v for k, v in ENABLED.items() if k != "slot_id"}, "slotId": "slot-json"}
    block["leaseSecs"] = 120
    path.write_text(json.dumps({"name": "runtime", "substrate": block}))
    config = SubstrateConfig.from_host_config(path)
    assert (config.enabled, config.slot_id, config.lease_secs) == (True, "slot-json", 120)


def test_from_host_config_without_block_is_disabled(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"name": "runtime"}))
    assert SubstrateConfig.from_host_config(path) == SubstrateConfig()


def test_from_host_config_refuses_a_non_object_block(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"substrate": ["enabled"]}))
    with pytest.raises(ValueError, match=r"'substrate' block .* JSON object, got: list"):
        SubstrateConfig.from_host_config(path)


def test_from_host_config_invalid_json_names_the_file_not_the_content(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text('{"substrate": {"credential": "x", "oops-secret"}}')
    with pytest.raises(ValueError) as info:
        SubstrateConfig.from_host_config(path)
    assert str(path) in str(info.value) and "oops-secret" not in str(info.value)


def test_from_host_config_validates_the_block(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"substrate": {**ENABLED, "host": ""}}))
    with pytest.raises(ValidationError, match="host"):
        SubstrateConfig.from_host_config(path)
