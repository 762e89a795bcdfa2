"""Recurring schedules: the file, upsert in place, ticks that enqueue each run once."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from substrate_db import Substrate
from substrate_db._queries import rendered_queries
from substrate_db.schedules import ScheduleFileError, ScheduleSpec, tick, upsert

from ._support import HERE, Run, Spawn

FIXTURE = HERE.parent.parent / "fixtures" / "heartbeat.schedule.json"
Q = rendered_queries("substrate")


def _write(tmp_path: Path, **spec: Any) -> Path:
    path = tmp_path / f"{spec.get('name', 'x')}.schedule.json"
    path.write_text(json.dumps(spec))
    return path


def _jobs_of(substrate: Substrate, kind: str) -> list[tuple[int, str | None]]:
    with substrate.pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, dedupe_key FROM substrate.jobs WHERE kind = %s ORDER BY id", [kind]
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def test_shipped_heartbeat_fixture_is_valid() -> None:
    spec = ScheduleSpec.from_file(FIXTURE)
    assert spec.interval_secs == 3600 and spec.enabled


def test_schedule_commands(run: Run, substrate_dsn: str, substrate: Substrate) -> None:
    d = ("--dsn", substrate_dsn)
    created = run(*d, "schedule-create", "--file", str(FIXTURE), "--json")
    assert created.code == 0, created.err
    doc = created.json()
    spec = json.loads(FIXTURE.read_text())
    assert doc["created"] is True and {k: doc[k] for k in spec} == spec
    assert doc["next_run_at"] and doc["last_run_at"] is None  # due at once

    listed = run(*d, "schedule", "list", "--json").json()
    assert [s["name"] for s in listed] == [spec["name"]]
    assert set(listed[0]) >= {*spec, "next_run_at", "enabled", "priority", "max_attempts"}

    ticked = run(*d, "schedule-tick", "--json")
    assert ticked.code == 0
    first = ticked.json()
    assert [e["name"] for e in first["enqueued"]] == [spec["name"]]
    job_id = first["enqueued"][0]["job_id"]
    assert substrate.get_job(job_id) is not None
    nxt = datetime.fromisoformat(first["schedules"][0]["next_run_at"])
    due = datetime.fromisoformat(first["enqueued"][0]["due_at"])
    assert nxt - due == timedelta(seconds=3600)

    text = run(*d, "schedule", "tick")  # nothing due now; still prints the next run
    assert text.code == 0 and f"next {spec['name']}" in text.out and "enqueued" not in text.out

    assert "heartbeat" in run(*d, "schedule", "list").out
    gone = run(*d, "schedule", "delete", spec["name"], "--json")
    assert (gone.code, gone.json()) == (0, {"name": spec["name"], "deleted": True})
    again = run(*d, "schedule", "delete", spec["name"])
    assert again.code == 1 and "not found" in again.err
    assert substrate.get_job(job_id) is not None  # its job stays


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "a", "kind": "k", "interval_secs": 0}, "interval_secs"),
        ({"name": "a", "kind": "k", "interval_secs": "60"}, "interval_secs"),
        (
            {"name": "a", "kind": "k", "interval_secs": 60, "cron": "* * * * *"},
            "unknown key 'cron'",
        ),
        ({"name": "a", "interval_secs": 60}, "missing key 'kind'"),
        ({"name": "", "kind": "k", "interval_secs": 60}, "name"),
        ({"name": "a", "kind": "k", "interval_secs": 60, "enabled": "yes"}, "enabled"),
        ({"name": "a", "kind": "k", "interval_secs": 60, "priority": 40000}, "priority"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_schedule_files_exit_2(
    run_inproc: Run, substrate_dsn: str, tmp_path: Path, spec: Any, message: str
) -> None:
    path = tmp_path / "bad.schedule.json"
    path.write_text(json.dumps(spec))
    ran = run_inproc("--dsn", substrate_dsn, "schedule-create", "--file", str(path))
    assert ran.code == 2 and message in ran.err and "Traceback" not in ran.err
    with pytest.raises(ScheduleFileError):
        ScheduleSpec.from_file(path)


def test_upsert_recomputes_next_run_from_the_new_interval(substrate: Substrate) -> None:
    t0 = substrate.db_now()
    spec = ScheduleSpec(name="s", kind="k", interval_secs=600)
    made = substrate.run(upsert(Q, spec, t0))
    assert made.created and made.schedule.next_run_at == t0  # new: due at once

    ran = substrate.run(tick(Q, t0))
    assert [r.due_at for r in ran.runs] == [t0]
    assert ran.schedules[0].next_run_at == t0 + timedelta(seconds=600)

    # A shorter interval: the next run is the last run plus the *new* interval.
    later = t0 + timedelta(seconds=30)
    changed = substrate.run(upsert(Q, spec.model_copy(update={"interval_secs": 60}), later))
    assert not changed.created
    assert changed.schedule.next_run_at == t0 + timedelta(seconds=60)
    assert changed.schedule.last_run_at == t0
    # Disabled: never due; enabled again: due from its grid.
    off = substrate.run(upsert(Q, spec.model_copy(update={"enabled": False}), later))
    assert not substrate.run(tick(Q, t0 + timedelta(hours=5))).runs
    assert off.schedule.enabled is False
    on = substrate.run(upsert(Q, spec.model_copy(update={"kind": "k2"}), t0 + timedelta(hours=5)))
    assert on.schedule.kind == "k2" and on.schedule.next_run_at == t0 + timedelta(seconds=600)


def test_missed_runs_coalesce_into_one(substrate: Substrate) -> None:
    t0 = substrate.db_now()
    substrate.run(upsert(Q, ScheduleSpec(name="c", kind="coal", interval_secs=60), t0))
    substrate.run(tick(Q, t0))
    # Nobody ticked for ten and a half intervals: one run, for the latest grid point.
    late = t0 + timedelta(seconds=60 * 10 + 30)
    ran = substrate.run(tick(Q, late))
    assert len(ran.runs) == 1
    assert ran.runs[0].due_at == t0 + timedelta(seconds=600)
    assert ran.schedules[0].next_run_at == t0 + timedelta(seconds=660)
    assert not substrate.run(tick(Q, late)).runs  # and not again
    assert len(_jobs_of(substrate, "coal")) == 2


def test_concurrent_tickers_enqueue_each_run_once(substrate: Substrate) -> None:
    t0 = substrate.db_now()
    for i in range(150):
        substrate.run(upsert(Q, ScheduleSpec(name=f"s{i}", kind="race", interval_secs=60), t0))
    barrier = threading.Barrier(8)
    runs: list[int] = []
    lock = threading.Lock()

    def ticker() -> None:
        for step in range(3):  # three grid points, every ticker ticks each
            # All tickers start a grid point together. Without this, a ticker that is
            # already at the next grid point legitimately coalesces a run that a slower
            # ticker still held locked: missed runs collapse into one, by design.
            barrier.wait()
            got = substrate.run(tick(Q, t0 + timedelta(seconds=60 * step), page_size=7))
            with lock:
                runs.extend(r.job_id for r in got.runs if r.job_id is not None)

    threads = [threading.Thread(target=ticker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = _jobs_of(substrate, "race")
    keys = [k for _, k in jobs]
    assert len(jobs) == len(runs) == 450
    assert len(set(keys)) == 450 and all(k and k.startswith("schedule:s") for k in keys)


def test_two_tick_processes_enqueue_each_due_run_once(
    spawn_cli: Spawn, substrate_dsn: str, substrate: Substrate
) -> None:
    t0 = substrate.db_now()
    for i in range(300):
        substrate.run(upsert(Q, ScheduleSpec(name=f"p{i}", kind="proc", interval_secs=3600), t0))
    procs = [spawn_cli("--dsn", substrate_dsn, "schedule-tick", "--json") for _ in range(2)]
    enqueued: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        enqueued += [e["job_id"] for e in json.loads(out)["enqueued"]]
    jobs = _jobs_of(substrate, "proc")
    assert sorted(enqueued) == [j for j, _ in jobs] and len(jobs) == 300
    assert len({k for _, k in jobs}) == 300


def test_tick_every_stops_on_sigterm(spawn_cli: Spawn, substrate_dsn: str) -> None:
    import signal

    proc = spawn_cli("--dsn", substrate_dsn, "schedule-tick", "--every", "0.2", "--json")
    assert proc.stdout is not None
    first = proc.stdout.readline()  # one pass done: the loop is running
    assert json.loads(first) == {"enqueued": [], "schedules": []}
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert all(json.loads(line) for line in out.splitlines() if line) or out == ""
    assert "Traceback" not in err
