"""`results` and `slots`, and enqueue's --source-id/--serial-key, both in-process and as
a real process."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable

from substrate_db import SlotHeartbeat, SlotStatus, Substrate

from ._support import Run


def test_results_delivers_each_outcome_once(
    run: Run, substrate: Substrate, substrate_dsn: str
) -> None:
    done = run("--dsn", substrate_dsn, "enqueue", "t", "--source-id", "ws-a", "--json")
    assert done.code == 0, done.err
    job_id = json.loads(done.out)["id"]
    job = substrate.claim_next_job("w", ["t"])
    assert job is not None and job.id == job_id
    substrate.complete_job(job.id, job.claim_epoch, {"answer": 42})
    other = run("--dsn", substrate_dsn, "results", "--source", "ws-b", "--json")
    assert other.code == 0 and json.loads(other.out) == []
    got = run("--dsn", substrate_dsn, "results", "--source", "ws-a", "--json")
    assert got.code == 0, got.err
    (outcome,) = json.loads(got.out)
    assert (outcome["job_id"], outcome["state"], outcome["result"]) == (
        job_id,
        "completed",
        {"answer": 42},
    )
    again = run("--dsn", substrate_dsn, "results", "--source", "ws-a")
    assert again.code == 0 and str(job_id) not in again.out
    missing = run("--dsn", substrate_dsn, "results")
    assert missing.code == 2 and "Traceback" not in missing.err and "--source" in missing.err


def test_enqueue_serial_key(run: Run, substrate: Substrate, substrate_dsn: str) -> None:
    for _ in range(2):
        assert run("--dsn", substrate_dsn, "enqueue", "turn", "--serial-key", "conv-1").code == 0
    first = substrate.claim_next_job("w", ["turn"])
    assert first is not None and first.serial_key == "conv-1"
    assert substrate.claim_next_job("w", ["turn"]) is None


def test_slots_lists_liveness(run: Run, substrate: Substrate, substrate_dsn: str) -> None:
    status = SlotStatus("rt-1/slot-0", ["turn"], interval_secs=10)
    status.mark_wedged("tool call hung")
    SlotHeartbeat(substrate, status).beat()
    got = run("--dsn", substrate_dsn, "slots", "--json")
    assert got.code == 0, got.err
    (slot,) = json.loads(got.out)
    assert (slot["slot_id"], slot["state"], slot["reason"]) == (
        "rt-1/slot-0",
        "wedged",
        "tool call hung",
    )
    text = run("--dsn", substrate_dsn, "slots")
    assert "rt-1/slot-0" in text.out and "wedged" in text.out
    stats = run("--dsn", substrate_dsn, "stats", "--json")
    assert [s["slot_id"] for s in json.loads(stats.out)["slots"]] == ["rt-1/slot-0"]


def test_results_follow_stops_on_sigterm(
    spawn_cli: Callable[..., subprocess.Popen[str]], substrate: Substrate, substrate_dsn: str
) -> None:
    job_id = substrate.enqueue("t", source_id="ws")
    job = substrate.claim_next_job("w", ["t"])
    assert job is not None
    substrate.complete_job(job.id, job.claim_epoch, "ok")
    proc = spawn_cli(
        "--dsn",
        substrate_dsn,
        "results",
        "--source",
        "ws",
        "--follow",
        "--json",
        "--interval",
        "0.1",
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert json.loads(line)["job_id"] == job_id
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
