"""Replicas and async jobs: the queueing and the expiry of the hosted service.

The seed ``endpoints.txt``: "1 GPU can support a single request at a time. Concurrent
requests exceeding the maximum replicas will be placed in a queue until a replica is
available." :class:`ReplicaPool` is that queue, shared by sync requests and async
jobs. :class:`JobStore` is the Ray Serve job board's in-memory store: it forgets a result
``result_ttl_s`` after it finished (the seed: 24 hours). A single server keeps its jobs
in the durable :mod:`~dagster_octoai.server.jobstore` instead.

Each job records its *owner* (see :mod:`dagster_octoai.server.security`); a job is
visible only to its owner and the admin, to anyone else it is as unknown as a wrong id.
Response ids carry 128 random bits. A job may hold a *lease*: one whose holder stops
renewing it (a Ray Serve replica that died with the job) fails when the lease runs out,
so a poll sees ``failed`` instead of ``running`` forever.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from ..api.models import ImageGenerationRequest, JobStatus

__all__ = ["Job", "JobStore", "JobView", "ReplicaPool", "new_response_id"]

_SWEEP_INTERVAL_S = 1.0


class ReplicaPool:
    """At most ``replicas`` generations at once; the rest wait in arrival order.

    ``replicas`` is read on every acquire, so a runtime change applies to the queue
    at once. Use as ``async with pool:``.
    """

    def __init__(self, replicas: Callable[[], int], on_change: Callable[[int, int], None]) -> None:
        self._replicas = replicas
        self._on_change = on_change
        self._cond = asyncio.Condition()
        self.in_flight = 0
        self.queued = 0

    async def __aenter__(self) -> None:
        async with self._cond:
            if self.in_flight >= self._replicas():
                self.queued += 1
                self._on_change(self.in_flight, self.queued)
                try:
                    await self._cond.wait_for(lambda: self.in_flight < self._replicas())
                finally:
                    self.queued -= 1
            self.in_flight += 1
            self._on_change(self.in_flight, self.queued)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    async def resized(self) -> None:
        """Wake waiters after ``replicas`` grew."""
        async with self._cond:
            self._cond.notify_all()


def new_response_id() -> str:
    """A fresh response id: 128 random bits, shaped like the hosted service's ("778bbfd58c-…")."""
    digits = secrets.token_hex(16)
    return f"{digits[:10]}-{digits[10:]}"


LOST_MESSAGE = "The replica running this job stopped before it finished; resubmit the request."


@dataclass
class Job:
    """One async job: who submitted it, where it is, and its answer once done."""

    response_id: str
    request: ImageGenerationRequest | None
    submitted_at: float
    fails: bool
    owner: str = ""
    status: JobStatus = JobStatus.PENDING
    finished_at: float | None = None
    body: bytes | None = None
    error: str | None = None
    #: Monotonic time by which the job's holder must renew its lease; None = no lease.
    lease_until: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def expired(self, now: float, ttl_s: float) -> bool:
        return self.finished_at is not None and now >= self.finished_at + ttl_s

    def readable_by(self, owner: str, admin: bool) -> bool:
        return admin or secrets.compare_digest(self.owner, owner)

    def finish(
        self, status: JobStatus, *, body: bytes | None = None, error: str | None = None
    ) -> None:
        if self.status in (JobStatus.COMPLETED, JobStatus.FAILED):
            return  # the first end wins: a late answer from a lost replica changes nothing
        self.status, self.body, self.error = status, body, error
        self.finished_at = time.monotonic()
        self.lease_until = None

    def view(self, *, with_body: bool) -> JobView:
        return JobView(self.response_id, self.status, self.error, self.body if with_body else None)


@dataclass(frozen=True)
class JobView:
    """What a poll or fetch sees of a job (the body only when asked for)."""

    response_id: str
    status: JobStatus
    error: str | None = None
    body: bytes | None = None


class JobStore:
    """Async jobs by ``response_id``; finished ones vanish ``ttl_s`` after they finish."""

    def __init__(self, ttl_s: Callable[[], float], on_expire: Callable[[int], None]) -> None:
        self._jobs: dict[str, Job] = {}
        self._ttl_s = ttl_s
        self._on_expire = on_expire
        self._next_sweep = 0.0

    def add(
        self,
        request: ImageGenerationRequest | None,
        *,
        fails: bool,
        owner: str = "",
        lease_s: float | None = None,
    ) -> Job:
        now = time.monotonic()
        job = Job(new_response_id(), request, now, fails, owner=owner)
        if lease_s is not None:
            job.lease_until = now + lease_s
        self._jobs[job.response_id] = job
        return job

    def get(self, response_id: str) -> Job | None:
        """The job, or ``None`` when unknown or expired (an expired one is forgotten)."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self.sweep()
        job = self._jobs.get(response_id)
        if job is not None and job.expired(now, self._ttl_s()):
            del self._jobs[response_id]
            self._on_expire(1)
            return None
        if job is not None and job.lease_until is not None and now >= job.lease_until:
            job.finish(JobStatus.FAILED, error=LOST_MESSAGE)
        return job

    def view(
        self, response_id: str, owner: str, *, admin: bool = False, with_body: bool = False
    ) -> JobView | None:
        """What ``owner`` (or the admin) may see of a job; None for anyone else."""
        job = self.get(response_id)
        if job is None or not job.readable_by(owner, admin):
            return None
        return job.view(with_body=with_body)

    def renew(self, response_ids: list[str], lease_s: float) -> None:
        """Extend the leases of unfinished jobs whose holder is still alive."""
        until = time.monotonic() + lease_s
        for rid in response_ids:
            job = self._jobs.get(rid)
            if job is not None and job.lease_until is not None:
                job.lease_until = until

    def sweep(self) -> None:
        """Forget every expired job."""
        now = time.monotonic()
        # A full sweep on every poll cost 0.8 ms at 10,000 jobs (benchmark P5); the job
        # asked for is checked on its own above, so sweeping once a second only bounds memory.
        self._next_sweep = now + _SWEEP_INTERVAL_S
        ttl = self._ttl_s()
        gone = [rid for rid, job in self._jobs.items() if job.expired(now, ttl)]
        for rid in gone:
            del self._jobs[rid]
        if gone:
            self._on_expire(len(gone))

    def by_status(self) -> dict[str, int]:
        self.sweep()
        for rid in list(self._jobs):
            self.get(rid)  # a lapsed lease shows as failed in the counts too
        counts = Counter(job.status.value for job in self._jobs.values())
        return {s.value: counts.get(s.value, 0) for s in JobStatus if s is not JobStatus.UNKNOWN}

    def running_tasks(self) -> list[asyncio.Task[None]]:
        return [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
