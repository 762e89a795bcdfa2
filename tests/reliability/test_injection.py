"""SQL injection attempts travel as data and change nothing; schema names are validated.

Every string a caller controls (kind, slot id, dedupe key, source id, serial key, error
text, payload and result keys and values, schedule name, idempotency key) is sent with
quotes, semicolons, comments, dollar quotes, psycopg placeholders and our own `{schema}`
template marker. Each must come back byte for byte from the database, and the database
must hold exactly the objects it held before (no table dropped, no row deleted, no
schema created). Python never builds SQL from these values: they are bound parameters.

The schema name is the one identifier a caller chooses; it is validated as a plain
identifier (see test_fuzz_inputs for the fuzzed refusals) and, when valid but unusual
(mixed case), quoted so it names exactly that schema.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from substrate_db import InvalidArgument, JobState, Substrate
from substrate_db.cli import cli
from substrate_db.intake.idempotency import IdempotencyStore
from substrate_db.schedules import ScheduleSpec, list_schedules, tick, upsert
from substrate_db.schedules import delete as delete_schedule

NASTY = [
    "'); DROP TABLE substrate.jobs; --",
    "x'; DELETE FROM substrate.jobs WHERE '1'='1",
    '"; DROP SCHEMA substrate CASCADE; --',
    "' OR 1=1 --",
    "$$; DROP TABLE substrate.serial_keys; $$",
    "%(now)s %s %% {schema} {} $1",
    "/* */; TRUNCATE substrate.jobs; --",
    "a\\'; SELECT pg_sleep(10); --",
    "robert'); DROP TABLE students;--\n\t\u02bc\u2019 \U0001f600",
]


def objects(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """Every schema-qualified relation and function in the database (not the catalogs)."""
    return conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        " UNION ALL SELECT n.nspname, p.proname || '()' FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
        " ORDER BY 1, 2"
    ).fetchall()


@pytest.mark.parametrize("evil", NASTY, ids=range(len(NASTY)))
def test_strings_round_trip_as_data(substrate: Substrate, substrate_dsn: str, evil: str) -> None:
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        before = objects(conn)
        bystander = substrate.enqueue("bystander", {"keep": True})

        job_id = substrate.enqueue(
            evil, {evil: evil}, dedupe_key=evil, source_id=evil, serial_key=evil
        )
        # The dedupe key matches as a value: the same evil key dedupes to the same job.
        assert substrate.enqueue(evil, dedupe_key=evil) == job_id
        job = substrate.claim_next_job(evil, [evil, "other"], lease_secs=60)
        assert job is not None and job.id == job_id
        assert (job.kind, job.claimed_by, job.dedupe_key, job.source_id, job.serial_key) == (
            evil,
            evil,
            evil,
            evil,
            evil,
        )
        assert job.payload == {evil: evil}
        failed = substrate.fail_job(job.id, job.claim_epoch, evil, retry_in=0)
        assert failed.ok
        again = substrate.claim_next_job(evil, [evil], lease_secs=60)
        assert again is not None
        assert substrate.complete_job(again.id, again.claim_epoch, {evil: [evil]}).ok

        stored = substrate.get_job(job_id)
        assert stored is not None
        assert (stored.kind, stored.last_error, stored.result) == (evil, evil, {evil: [evil]})
        assert [j.id for j in substrate.list_jobs(kind=evil)] == [job_id]
        outcomes = substrate.fetch_results(evil)
        assert [(o.job_id, o.source_id) for o in outcomes] == [(job_id, evil)]

        # Schedules: the name and kind are values too (names are at most 160 characters).
        spec = ScheduleSpec(name=evil, kind=evil, payload={evil: 1}, interval_secs=60)
        assert substrate.run(upsert(substrate.queries, spec, None)).created
        ticked = substrate.run(tick(substrate.queries))
        assert [(r.name, r.kind) for r in ticked.runs] == [(evil, evil)]
        assert [s.name for s in substrate.run(list_schedules(substrate.queries))] == [evil]
        assert substrate.run(delete_schedule(substrate.queries, evil))

        # The idempotency store's key.
        store = IdempotencyStore()
        effects: list[int] = []
        assert store.run_once(conn, evil, lambda: effects.append(1) or evil) == evil
        assert store.run_once(conn, evil, lambda: effects.append(2) or "again") == evil
        assert effects == [1]

        # Nothing else moved: every object is still there, the bystander untouched.
        assert objects(conn) == before
        kept = substrate.get_job(bystander)
        assert (
            kept is not None and kept.state == JobState.AVAILABLE and kept.payload == {"keep": True}
        )
        count = conn.execute("SELECT count(*) FROM substrate.jobs").fetchone()
        assert count == (3,)  # bystander, the evil job, the schedule's run


def test_cli_strings_round_trip_as_data(substrate: Substrate, substrate_dsn: str) -> None:
    runner = CliRunner()
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        before = objects(conn)
        for evil in NASTY:
            result = runner.invoke(
                cli,
                ["--dsn", substrate_dsn, "enqueue", "--dedupe-key", evil, "--json", "--", evil],
            )
            assert result.exit_code == 0, result.output
            job_id = int(json.loads(result.stdout)["id"])
            listed = runner.invoke(
                cli, ["--dsn", substrate_dsn, "jobs", "list", "--kind", evil, "--json"]
            )
            assert listed.exit_code == 0, listed.output
            rows = json.loads(listed.stdout)
            assert [(r["id"], r["kind"], r["dedupe_key"]) for r in rows] == [(job_id, evil, evil)]
        assert objects(conn) == before


@pytest.mark.parametrize(
    "schema",
    [
        'substrate"; DROP SCHEMA public CASCADE; --',
        "substrate; DROP TABLE substrate.jobs",
        "public.jobs",
        "substrate--",
        "",
        "x" * 64,
    ],
)
def test_schema_name_is_validated_before_anything_runs(substrate_dsn: str, schema: str) -> None:
    with psycopg.connect(substrate_dsn, autocommit=True) as conn:
        before = objects(conn)
        with pytest.raises(InvalidArgument) as caught:
            Substrate.connect(substrate_dsn, schema=schema)
        assert caught.value.field == "schema"
        result = CliRunner().invoke(cli, ["--dsn", substrate_dsn, "--schema", schema, "migrate"])
        assert result.exit_code == 2, result.output
        assert objects(conn) == before


def test_unusual_but_valid_schema_name_is_quoted_exactly(substrate_dsn: str) -> None:
    """A mixed-case schema is a quoted identifier: it must create and use exactly
    "Robert_Tables", never fold to robert_tables, and leave `substrate` alone."""
    with (
        psycopg.connect(substrate_dsn, autocommit=True) as conn,
        Substrate.connect(substrate_dsn, schema="Robert_Tables") as client,
    ):
        client.migrate()
        job_id = client.enqueue("k")
        job = client.claim_next_job("slot", ["k"])
        assert job is not None and job.id == job_id
        assert client.complete_job(job.id, job.claim_epoch).ok
        schemas = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace").fetchall()}
        assert "Robert_Tables" in schemas and "robert_tables" not in schemas
        assert conn.execute('SELECT count(*) FROM "Robert_Tables".jobs').fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM substrate.jobs").fetchone() == (0,)
