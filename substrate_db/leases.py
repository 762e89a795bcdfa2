"""The leases a heartbeat carries: which claims to renew, and which were found lost.

`LeaseBook` is the one record of tracked claims, shared by every heartbeat (the intake's
`LeaseKeeper`, the slot's `SlotHeartbeat`): it holds no I/O and is safe across threads.
`LeaseTracking` gives a heartbeat class the public tracking methods over its book.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .errors import InvalidArgument
from .models import ClaimedJob, WriteBackResult


class _Settable(Protocol):
    def set(self) -> None: ...


E = TypeVar("E", bound=_Settable)


def lease_ref(job: object) -> tuple[int, int]:
    """The (job id, claim epoch) of a claimed job, of a (job_id, claim_epoch) pair, or of
    anything with a `substrate_lease()` method that says (the intake's `LocalTask`)."""
    if isinstance(job, ClaimedJob):
        return job.id, job.claim_epoch
    own = getattr(job, "substrate_lease", None)
    if callable(own) and (ref := own()) is not None:
        return lease_ref(ref)
    if (
        isinstance(job, tuple)
        and len(job) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in job)
    ):
        return job[0], job[1]
    raise InvalidArgument(
        "job", job, "a ClaimedJob, a LocalTask made from a job, or a (job_id, claim_epoch) pair"
    )


@dataclass(slots=True)
class _Lease(Generic[E]):
    epoch: int
    event: E
    lost: WriteBackResult | None = None


class LeaseBook(Generic[E]):
    """The tracked leases and what happened to them; no I/O, safe across threads."""

    def __init__(self, make_event: Callable[[], E]) -> None:
        self._make_event = make_event
        self._leases: dict[int, _Lease[E]] = {}
        self._lock = threading.Lock()

    def track(self, job_id: int, epoch: int) -> E:
        """Start renewing this claim; return its lost-event. Tracking the same claim
        again returns the same event; a newer epoch of the job replaces the old one."""
        with self._lock:
            lease = self._leases.get(job_id)
            if lease is None or lease.epoch != epoch:
                lease = self._leases[job_id] = _Lease(epoch, self._make_event())
            return lease.event

    def untrack(self, job_id: int) -> None:
        """Forget a job (finished, or given up): no more renewals, no more reports."""
        with self._lock:
            self._leases.pop(job_id, None)

    def lost(self, job_id: int) -> bool:
        """Whether a beat found that this job's lease was lost."""
        with self._lock:
            lease = self._leases.get(job_id)
            return lease is not None and lease.lost is not None

    def event(self, job_id: int) -> E | None:
        with self._lock:
            lease = self._leases.get(job_id)
            return None if lease is None else lease.event

    def tracked(self) -> list[tuple[int, int]]:
        """(job id, epoch) of every tracked job, lost or not."""
        with self._lock:
            return [(job_id, lease.epoch) for job_id, lease in self._leases.items()]

    def due(self) -> list[tuple[int, int]]:
        """The claims to renew at the next beat: tracked and not lost, by job id."""
        with self._lock:
            return sorted((j, lease.epoch) for j, lease in self._leases.items() if not lease.lost)

    def settle(self, results: list[WriteBackResult]) -> list[WriteBackResult]:
        """Record a beat's results; return the refusals that are news (the job is still
        tracked under the same epoch and was not already lost). Their events are set."""
        news: list[WriteBackResult] = []
        events: list[E] = []
        with self._lock:
            for result in results:
                lease = self._leases.get(result.job_id)
                if result.ok or lease is None or lease.epoch != result.expected_epoch:
                    continue
                if lease.lost is None:
                    lease.lost = result
                    news.append(result)
                    events.append(lease.event)
        for event in events:
            event.set()
        return news


class LeaseTracking(Generic[E]):
    """Tracking methods over `self._book`, shared by the heartbeat classes."""

    _book: LeaseBook[E]

    def _lease_ref(self, job: Any) -> tuple[int, int]:
        return lease_ref(job)

    def track(self, job: Any) -> E:
        """Renew this claim's lease from the next beat on; return the event set when
        the lease is lost."""
        return self._book.track(*self._lease_ref(job))

    def untrack(self, job_id: int) -> None:
        """Stop renewing (call it before the job's write-back)."""
        self._book.untrack(job_id)

    def lost(self, job_id: int) -> bool:
        """Whether the lease of this tracked job was found lost."""
        return self._book.lost(job_id)

    def lost_event(self, job_id: int) -> E | None:
        """The event `track()` returned for this job, or None when it is not tracked."""
        return self._book.event(job_id)

    def tracked(self) -> list[tuple[int, int]]:
        """(job id, claim epoch) of every tracked job."""
        return self._book.tracked()
