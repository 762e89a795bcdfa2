"""Jobs to local tasks, the write-back target of a task, and the SQLite local queue."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from substrate_db import ClaimedJob
from substrate_db.intake import LocalTask, LocalTaskQueue, SQLiteTaskQueue
from substrate_db.intake.logic import (
    JobParseError,
    WriteBackTarget,
    task_from_job,
    write_back_target,
)


def claimed(payload: Any, *, kind: str = "email", job_id: int = 42, epoch: int = 3) -> ClaimedJob:
    now = datetime.now(UTC)
    return ClaimedJob(
        id=job_id,
        kind=kind,
        payload=payload,
        priority=0,
        run_at=now,
        attempts=epoch,
        max_attempts=5,
        claim_epoch=epoch,
        claimed_by="slot-a",
        lease_expires_at=now + timedelta(seconds=300),
        dedupe_key=None,
        created_at=now,
    )


def test_task_from_job() -> None:
    task = task_from_job(claimed({"subject": "Welcome Ada", "to": "ada@example.com"}))
    assert task == LocalTask(
        subject="Welcome Ada",
        source="substrate:42",
        priority=1,
        max_attempts=1,
        payload={
            "subject": "Welcome Ada",
            "to": "ada@example.com",
            "_substrate_job_id": 42,
            "_substrate_claim_epoch": 3,
            "idempotency_key": "substrate-42-e3",
        },
    )


def test_subject_falls_back_to_the_kind() -> None:
    assert task_from_job(claimed({"to": "x"}, kind="report.build")).subject == "report.build"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (["not", "an", "object"], "to be a JSON object, got: list"),
        ("text", "to be a JSON object, got: str"),
        ({"subject": 5}, "payload.subject of job 42 to be a non-empty string, got: 5"),
        ({"subject": "  "}, "payload.subject of job 42 to be a non-empty string"),
        ({"idempotency_key": "mine"}, "reserved key(s) ['idempotency_key']"),
    ],
)
def test_jobs_that_cannot_become_tasks(payload: Any, message: str) -> None:
    with pytest.raises(JobParseError) as info:
        task_from_job(claimed(payload))
    assert message in str(info.value)


def test_write_back_target() -> None:
    task = task_from_job(claimed({}))
    assert write_back_target(task) == WriteBackTarget(42, 3)
    other = LocalTask(subject="s", source="cron", payload={"_substrate_job_id": 42})
    assert write_back_target(other) == "not-from-substrate"
    missing = LocalTask(subject="s", source="substrate:42", payload={})
    assert write_back_target(missing) == "missing-_substrate_job_id"
    no_epoch = LocalTask(subject="s", source="substrate:42", payload={"_substrate_job_id": 42})
    assert write_back_target(no_epoch) == "missing-or-bad-_substrate_claim_epoch"
    mismatch = task.model_copy(update={"source": "substrate:7"})
    assert write_back_target(mismatch) == "source-disagrees-with-_substrate_job_id"


def test_sqlite_queue_round_trip(tmp_path: Path) -> None:
    with SQLiteTaskQueue(tmp_path / "q.db") as queue:
        assert isinstance(queue, LocalTaskQueue)
        task = task_from_job(claimed({"subject": "hi", "n": [1, 2]}))
        task_id = queue.enqueue_task(task)
        assert isinstance(task_id, str)
        assert queue.get_task(task_id) == task
        assert queue.get_task("999") is None and queue.get_task("nonsense") is None
        assert queue.state(task_id) == "queued"
        taken = queue.take_next()
        assert taken is not None and (taken.task_id, taken.task, taken.attempt) == (
            task_id,
            task,
            1,
        )
        assert queue.state(task_id) == "running"
        assert queue.take_next() is None
        assert queue.finish(task_id, ok=True, result={"sent": True}) == "done"
        assert queue.finish(task_id, ok=True) is None  # not running any more
    # The file keeps the tasks.
    with SQLiteTaskQueue(tmp_path / "q.db") as again:
        assert again.state(task_id) == "done"


def test_sqlite_queue_order_and_local_retries() -> None:
    with SQLiteTaskQueue(":memory:") as queue:
        low = queue.enqueue_task(LocalTask(subject="later", source="local", priority=5))
        retry = queue.enqueue_task(
            LocalTask(subject="retry", source="local", priority=1, max_attempts=2)
        )
        first = queue.take_next()
        assert first is not None and first.task_id == retry
        assert queue.finish(retry, ok=False, error="boom") == "queued"
        second = queue.take_next()
        assert second is not None and (second.task_id, second.attempt) == (retry, 2)
        assert queue.finish(retry, ok=False, error="boom") == "failed"
        last = queue.take_next()
        assert last is not None and last.task_id == low


def test_sqlite_queue_hands_each_task_out_once_across_threads(tmp_path: Path) -> None:
    with SQLiteTaskQueue(tmp_path / "q.db") as queue:
        ids = {queue.enqueue_task(LocalTask(subject=f"t{i}", source="local")) for i in range(200)}
        taken: list[str] = []
        lock = threading.Lock()

        def worker() -> None:
            while (item := queue.take_next()) is not None:
                with lock:
                    taken.append(item.task_id)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(taken) == sorted(ids)
