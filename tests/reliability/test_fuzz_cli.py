"""Bad CLI input, fuzzed: exit code 2, an `Error:` line on stderr, nothing on stdout, no
traceback, and the database unchanged.

Commands run in-process through click's test runner (fast enough for hypothesis) with
`--json`, so "nothing on stdout" also proves no half-written JSON document escapes.
One case per option that takes a value the user types; each draws values that are not
valid for it (numbers out of range or not numbers at all, JSON that is not JSON or holds
what jsonb cannot store, timestamps without an offset, names that are empty or too long,
durations that are not durations, schemas that are not identifiers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from substrate_db.cli import cli

from ._fingerprint import fingerprint
from .conftest import Seeded

EXAMPLES = 15
_INT = re.compile(r"\s*[+-]?\d+\s*")

_printable = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


def not_int_text() -> st.SearchStrategy[str]:
    return _printable.filter(lambda t: _INT.fullmatch(t) is None)


def int_outside(low: int | None, high: int | None) -> st.SearchStrategy[str]:
    options = [not_int_text()]
    if low is not None:
        options.append(st.integers(max_value=low - 1).map(str))
    if high is not None:
        options.append(st.integers(min_value=high + 1).map(str))
    return st.one_of(*options)


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


bad_payload = st.one_of(
    _printable.filter(lambda t: not t.startswith("@") and _not_json(t)),
    st.sampled_from(["NaN", "Infinity", "[-Infinity]", '{"a": NaN}', '{"s": "\\u0000"}']),
)
bad_run_at = st.one_of(
    st.datetimes().map(lambda d: d.isoformat()),  # no offset
    _printable.filter(lambda t: not re.search(r"\d{4}-\d{2}-\d{2}", t)),
)
bad_name = st.one_of(st.just(""), st.text("abcxyz", min_size=201, max_size=230))
_VALID_DURATION = re.compile(r"(?:\d+|(?:\d+[smhdw])+)")


def _is_bad_duration(text: str) -> bool:
    folded = text.strip().lower()
    # Digits that are not decimal (superscripts: '²') hit a known bug, tested on its own
    # below; they are kept out here so this case stays about everything else.
    if any(c.isdigit() and not c.isdecimal() for c in folded):
        return False
    return _VALID_DURATION.fullmatch(folded) is None


bad_duration = _printable.filter(_is_bad_duration)
bad_schema = st.one_of(
    st.text(min_size=1, max_size=20).filter(lambda s: not (s.isascii() and s.isidentifier())),
    st.sampled_from(['x"; DROP SCHEMA substrate CASCADE; --', "a.b", "1abc"]),
)


@dataclass(frozen=True)
class CliCase:
    id: str
    bad: st.SearchStrategy[str]
    argv: Any  # (value) -> list[str]


CASES = [
    CliCase(
        "enqueue.priority",
        int_outside(-32768, 32767),
        lambda v: ["enqueue", "k", "--priority", v, "--json"],
    ),
    CliCase(
        "enqueue.max-attempts",
        int_outside(1, 2**31 - 1),
        lambda v: ["enqueue", "k", "--max-attempts", v, "--json"],
    ),
    CliCase("enqueue.payload", bad_payload, lambda v: ["enqueue", "k", "--payload", v, "--json"]),
    CliCase("enqueue.run-at", bad_run_at, lambda v: ["enqueue", "k", "--run-at", v, "--json"]),
    CliCase("enqueue.kind", bad_name, lambda v: ["enqueue", "--json", "--", v]),
    CliCase(
        "enqueue.dedupe-key", bad_name, lambda v: ["enqueue", "k", "--dedupe-key", v, "--json"]
    ),
    CliCase("jobs.show", int_outside(1, None), lambda v: ["jobs", "show", "--json", "--", v]),
    CliCase(
        "jobs.cancel",
        int_outside(1, None),
        lambda v: ["jobs", "cancel", "--json", "--", v],
    ),
    CliCase("jobs.retry", int_outside(1, None), lambda v: ["jobs", "retry", "--json", "--", v]),
    CliCase(
        "jobs.list.limit", int_outside(1, None), lambda v: ["jobs", "list", "--limit", v, "--json"]
    ),
    CliCase(
        "jobs.list.state",
        _printable.filter(
            lambda t: t not in {"available", "running", "completed", "failed", "cancelled"}
        ),
        lambda v: ["jobs", "list", "--state", v, "--json"],
    ),
    CliCase(
        "recover-leases.limit",
        int_outside(1, None),
        lambda v: ["recover-leases", "--limit", v, "--json"],
    ),
    CliCase("prune.older-than", bad_duration, lambda v: ["prune", "--older-than", v, "--json"]),
    # Pruning may only ever delete finished jobs: an unfinished state is a usage error.
    CliCase(
        "prune.state",
        st.sampled_from(["running", "available", "completed,running", "bogus", "", ","]),
        lambda v: ["prune", "--older-than", "0", "--state", v, "--json"],
    ),
    CliCase("schema", bad_schema, lambda v: ["--schema", v, "jobs", "list", "--json"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_cli_input_exits_2_and_changes_nothing(seeded: Seeded, case: CliCase) -> None:
    runner = CliRunner()

    @given(value=case.bad)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(value: str) -> None:
        argv = ["--dsn", seeded.dsn, *case.argv(value)]
        result = runner.invoke(cli, argv)
        assert result.exit_code == 2, (argv, result.exit_code, result.output, result.stderr)
        assert result.stdout == "", result.stdout
        assert "Traceback" not in result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("Error: "), result.stderr
        assert fingerprint(seeded.check_conn) == seeded.before

    check()


def test_prune_refuses_non_decimal_digits_as_a_usage_error(seeded: Seeded) -> None:
    result = CliRunner().invoke(cli, ["--dsn", seeded.dsn, "prune", "--older-than", "²"])
    assert fingerprint(seeded.check_conn) == seeded.before
    assert result.exit_code == 2, result.stderr
