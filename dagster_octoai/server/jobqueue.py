"""Running async jobs from the durable job store: queue, claim, run, recover, expire.

One :class:`JobQueue` per server process. It keeps in memory only the ids of the jobs it
has queued and the control of the ones it is running; everything else is in the
:class:`~dagster_octoai.server.jobstore.JobStore`. Each transition is a compare-and-swap
of the job's record, so several processes on one store (Ray frontends, a restarted
server beside a dying one) claim, finish and expire each job once:

- **submit**: the input, then the ``pending`` record (the commit point); past
  ``max_queued_jobs`` queued here, a 429 with ``Retry-After`` and nothing written.
- **run**: a free replica claims the job (``pending`` -> ``running``, with this process as
  holder and a lease it renews), renders it, writes the result (the first written stays),
  then ``completed``. A job the holder stops holding (a lapsed lease: the process died)
  goes back to ``pending`` once, then ``failed`` with :data:`RESTART_MESSAGE`.
- **recover** (at start and every ``async_sweep_interval_s``): pending jobs in the store are
  queued, lapsed running ones retried or failed, finished ones past ``result_ttl_s``
  deleted; one listing, and only the records of unfinished jobs (their input is there) and
  of finished ones old enough to expire are read.
- **poll**: answered from the record this process last wrote when no other process can
  have changed it (:meth:`~.jobstore.JobStore.cached`), else read.
- **stop** (SIGTERM): nothing new is accepted or started; running jobs get
  ``shutdown_grace_s`` to finish, then go back to ``pending`` for the next server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..api.models import ImageGenerationRequest, JobStatus
from .config import ServerConfig
from .jobs import ReplicaPool
from .jobstore import FINAL, MAX_ATTEMPTS, RESTART_MESSAGE, JobStore, StoredJob
from .stats import ServerStats

__all__ = [
    "CURRENT_CONTROL",
    "IdempotencyConflict",
    "JobAnswer",
    "JobCancelled",
    "JobControl",
    "JobLost",
    "JobQueue",
    "QueueFull",
    "ShuttingDown",
]

T = TypeVar("T")

CANCELLED_MESSAGE = "cancelled by its owner"
#: A pending record this process wrote answers polls this long without a read: another
#: frontend on the store may have claimed the job since (then it shows pending that long).
POLL_STALE_S = 0.5
#: Inputs up to this size of jobs queued here are kept until they run (one read fewer
#: per job), at most _INPUTS_KEPT_BYTES in all; larger ones are read from the store.
_INPUT_KEPT_MAX = 64 * 1024
_INPUTS_KEPT_BYTES = 16 * 1024 * 1024
#: Finished jobs' inputs are deleted in batches this often (one request for many).
_DROP_INTERVAL_S = 0.2


class QueueFull(Exception):
    """``max_queued_jobs`` jobs wait here already (answered 429)."""


class ShuttingDown(Exception):
    """The server is stopping and accepts nothing new (answered 503)."""


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` already used with another body (answered 409)."""

    def __init__(self, response_id: str) -> None:
        super().__init__(response_id)
        self.response_id = response_id


class JobLost(Exception):
    """A render ended without an answer for a reason the job's error states (its message)."""


class JobCancelled(Exception):
    """A running job's owner cancelled it: raised from the render at its next step."""


@dataclass
class JobControl:
    """What a running job's render and its owner share: the cancel flag and the progress."""

    cancel: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    steps: int = 0

    def on_step(self, step: int, steps: int) -> None:
        """Called by a backend after each denoising step; raises once the job is cancelled."""
        self.step, self.steps = step, steps
        if self.cancel.is_set():
            raise JobCancelled()

    @property
    def progress(self) -> tuple[int, int] | None:
        return (self.step, self.steps) if self.steps else None


#: The control of the job being rendered, for a backend's step callback (None: no job).
CURRENT_CONTROL: ContextVar[JobControl | None] = ContextVar("octoai_job_control", default=None)

#: Renders a request on a replica already held: the answer body.
Render = Callable[[ImageGenerationRequest, JobControl], Awaitable[bytes]]


@dataclass(frozen=True)
class JobAnswer:
    """What a poll, fetch or cancel sees of a job; ``status`` None when it is ``gone``."""

    response_id: str
    status: JobStatus | None
    error: str | None = None
    #: Why there is no job: "expired" (made here, past its time) or "unknown".
    gone: str | None = None
    queue_position: int | None = None
    progress: tuple[int, int] | None = None
    body: bytes | None = None

    @classmethod
    def missing(cls, response_id: str, gone: str) -> JobAnswer:
        return cls(response_id, None, gone=gone)


class JobQueue:
    """This process's share of the jobs in ``store``, run on ``pool`` through ``render``."""

    def __init__(
        self,
        store: JobStore,
        *,
        config: Callable[[], ServerConfig],
        pool: ReplicaPool,
        render: Render,
        stats: ServerStats,
    ) -> None:
        self.store = store
        self._config = config
        self._pool = pool
        self._render = render
        self._stats = stats
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._io = ThreadPoolExecutor(max_workers=32, thread_name_prefix="octoai-jobstore")
        self._pending: dict[str, None] = {}  # queued here, in arrival order
        # Small inputs of jobs queued here (also in the store): one read fewer per job.
        self._inputs: dict[str, bytes] = {}
        self._inputs_bytes = 0
        # Finished jobs whose inputs are to be deleted, and the task that deletes them.
        self._finished: list[str] = []
        self._dropper: asyncio.Task[None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, JobControl] = {}
        self._accepting = True
        self._sweeper: asyncio.Task[None] | None = None
        #: Engines whose jobs another module renders from the stored JSON body (the video
        #: route registers ``svd``); every other engine is an image request for ``render``.
        self.renderers: dict[str, Callable[[bytes, JobControl], Awaitable[bytes]]] = {}

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def start(self) -> None:
        """Begin recovering and sweeping (the app's start-up)."""
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.create_task(self._sweep_forever())
            self._dropper = loop.create_task(self._drop_inputs_forever())

    # ---- submit, view, cancel -------------------------------------------------------

    async def submit(
        self,
        owner: str,
        engine: str,
        body: bytes,
        summary: dict[str, Any],
        fails: bool = False,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[StoredJob, bool]:
        """Store and queue a job: it, and whether it is new (not an idempotent repeat).

        ``engine`` is an image engine, or one in :attr:`renderers` (``svd``); ``summary`` is
        the request without its image payloads. ``idempotency`` is (key, body digest): the
        key's first job is returned instead of a new one while the result TTL lasts.

        Raises:
            QueueFull, ShuttingDown: nothing was stored.
            IdempotencyConflict: the key was used with another body.
        """
        if not self._accepting:
            raise ShuttingDown()
        bound = self._config().max_queued_jobs
        if bound is not None and len(self._pending) >= bound:
            raise QueueFull()
        rid, fresh = None, True
        if idempotency is not None:
            rid, fresh = await self.bind_key(owner, *idempotency)
        # A repeat whose job is missing: the first submission died between binding its
        # key and storing its job; this one stores it under the bound id.
        job = await self._store(owner, engine, body, summary, fails, rid)
        return job, fresh

    async def _store(
        self,
        owner: str,
        engine: str,
        body: bytes,
        summary: dict[str, Any],
        fails: bool,
        rid: str | None,
    ) -> StoredJob:
        job = await self._call(self.store.create, owner, engine, body, summary, fails, rid)
        if job.status is JobStatus.PENDING:
            self._enqueue(job.response_id, body)
        return job

    async def bind_key(self, owner: str, key: str, digest: str) -> tuple[str, bool]:
        """The response id an idempotency key stands for, and whether it was bound just now."""
        rid = self.store.new_response_id()
        entry = await self._call(
            self.store.remember, owner, key, digest, rid, self._config().result_ttl_s
        )
        if entry.body_digest != digest:
            raise IdempotencyConflict(entry.response_id)
        return entry.response_id, entry.response_id == rid

    async def run_sync(
        self,
        owner: str,
        req: ImageGenerationRequest,
        body: bytes,
        idempotency: tuple[str, str],
        generate: Callable[[], Awaitable[bytes]],
    ) -> StoredJob:
        """A sync request with an idempotency key: generated once, its answer kept as a job.

        The first request for the key runs ``generate`` and stores the answer; a repeat
        waits for that job to end and gets the same answer, paying nothing.
        """
        rid, fresh = await self.bind_key(owner, *idempotency)
        if fresh:
            # Stored as a pending job first: if this process dies, the job runs again as an
            # async one (a sweep finds it), and a repeat of the request collects it.
            await self._call(
                self.store.create, owner, req.engine.value, body, req.summary(), False, rid
            )
            claimed = await self._call(self.store.swap, rid, self._claim)
            if claimed is not None and claimed.status is JobStatus.RUNNING:
                try:
                    answer = await generate()
                except BaseException:
                    await self._call(self.store.forget_key, owner, idempotency[0])
                    await self._call(self.store.delete, rid)
                    raise
                await self._call(self.store.put_result, rid, answer)
                await self._call(
                    self.store.swap,
                    rid,
                    lambda j: self._if_mine(j, lambda: _ended(j, JobStatus.COMPLETED, None)),
                )
                self._finished.append(rid)
        while True:
            now = self.store.cached(rid, self.holder, POLL_STALE_S) or await self._call(
                self.store.read, rid
            )
            if now is None or now.finished:
                break
            await asyncio.sleep(0.1)
        return (
            now
            if now is not None
            else StoredJob(
                response_id=rid,
                owner=owner,
                engine=req.engine.value,
                submitted_at=time.time(),
                status=JobStatus.FAILED,
                error="The first request with this Idempotency-Key failed; retry.",
            )
        )

    async def answer(
        self, response_id: str, owner: str, *, admin: bool, with_body: bool
    ) -> JobAnswer:
        job = self.store.cached(response_id, self.holder, POLL_STALE_S)
        if job is None:
            job = await self._call(self.store.read, response_id)
        if job is None:
            ours = self.store.origin(response_id) == "ours"
            return JobAnswer.missing(response_id, "expired" if ours else "unknown")
        if not job.readable_by(owner, admin):
            # Someone else's: its existence is not confirmed.
            return JobAnswer.missing(response_id, "unknown")
        if job.expired(time.time(), self._config().result_ttl_s):
            return JobAnswer.missing(response_id, "expired")
        position = None
        if job.status is JobStatus.PENDING and response_id in self._pending:
            position = list(self._pending).index(response_id)
        control = self._running.get(response_id)
        progress = control.progress if control is not None else job.progress
        body = None
        if with_body and job.status is JobStatus.COMPLETED:
            body = await self._call(self.store.result, response_id)
        return JobAnswer(
            response_id,
            job.status,
            job.error,
            None,
            position,
            progress if job.status is JobStatus.RUNNING else None,
            body,
        )

    async def result(self, response_id: str) -> bytes | None:
        return await self._call(self.store.result, response_id)

    async def cancel(self, response_id: str, owner: str, *, admin: bool) -> JobAnswer:
        """Cancel a pending job at once, a running one at its next step."""
        found = await self.answer(response_id, owner, admin=admin, with_body=False)
        if found.status is None or found.status in FINAL:
            return found

        def change(job: StoredJob) -> StoredJob | None:
            if job.finished:
                return None
            if job.status is JobStatus.PENDING:
                return _ended(job, JobStatus.CANCELLED, CANCELLED_MESSAGE)
            return job.evolve(cancel_requested=True)

        job = await self._call(self.store.swap, response_id, change)
        if job is not None and job.status is JobStatus.CANCELLED:
            self._finished.append(response_id)
            self._pending.pop(response_id, None)
        if (control := self._running.get(response_id)) is not None:
            control.cancel.set()
        return await self.answer(response_id, owner, admin=admin, with_body=False)

    # ---- running --------------------------------------------------------------------

    def _enqueue(self, response_id: str, body: bytes | None = None) -> None:
        if response_id in self._tasks or not self._accepting:
            return
        self._pending[response_id] = None
        if (
            body is not None
            and len(body) <= _INPUT_KEPT_MAX
            and self._inputs_bytes + len(body) <= _INPUTS_KEPT_BYTES
        ):
            self._inputs[response_id] = body
            self._inputs_bytes += len(body)
        task = asyncio.get_running_loop().create_task(self._run(response_id))
        self._tasks[response_id] = task

    async def _run(self, response_id: str) -> None:
        try:
            delay = self._config().async_queue_delay_s
            if delay > 0:
                await asyncio.sleep(delay)
            # The replica is held from the claim to the render's end, not while the result
            # and the completion are written: the next job starts meanwhile.
            async with contextlib.AsyncExitStack() as replica:
                await replica.enter_async_context(self._pool)
                self._pending.pop(response_id, None)
                if not self._accepting:
                    return  # stopping: the job stays pending in the store for the next server
                job = await self._call(self.store.swap, response_id, self._claim)
                if job is not None and job.status is JobStatus.RUNNING:
                    await self._execute(job, replica.aclose)
                elif job is not None and job.finished:
                    self._finished.append(response_id)
        except Exception as exc:  # a store error must not leave the job running for ever
            error = _failure(exc)
            with contextlib.suppress(Exception):
                await self._call(
                    self.store.swap,
                    response_id,
                    lambda j: self._if_mine(j, lambda: _ended(j, JobStatus.FAILED, error)),
                )
        finally:
            self._pending.pop(response_id, None)
            self._tasks.pop(response_id, None)
            self._inputs_bytes -= len(self._inputs.pop(response_id, b""))

    def _claim(self, job: StoredJob) -> StoredJob | None:
        if job.status is not JobStatus.PENDING:
            return None
        if job.attempts >= MAX_ATTEMPTS:
            return _ended(job, JobStatus.FAILED, RESTART_MESSAGE)
        now = time.time()
        return job.evolve(
            status=JobStatus.RUNNING,
            attempts=job.attempts + 1,
            started_at=now,
            holder=self.holder,
            lease_until=now + self._config().async_lease_s,
        )

    def _if_mine(self, job: StoredJob, change: Callable[[], StoredJob]) -> StoredJob | None:
        if job.status is not JobStatus.RUNNING or job.holder != self.holder:
            return None  # no longer ours: its lease lapsed and another server took it
        return change()

    async def _execute(self, job: StoredJob, free: Callable[[], Awaitable[None]]) -> None:
        """Render ``job``, calling ``free`` once its replica is no longer needed."""
        rid = job.response_id
        control = JobControl()
        if job.cancel_requested:
            control.cancel.set()
        self._running[rid] = control
        renewing = asyncio.get_running_loop().create_task(self._renew(rid, control))
        try:
            end = await self._render_job(job, control, free)
        finally:
            renewing.cancel()
            self._running.pop(rid, None)
        if end is None:
            return  # released at shutdown
        status, error = end
        written = await self._call(
            self.store.swap, rid, lambda j: self._if_mine(j, lambda: _ended(j, status, error))
        )
        if written is not None:
            self._finished.append(rid)

    async def _render_job(
        self, job: StoredJob, control: JobControl, free: Callable[[], Awaitable[None]]
    ) -> tuple[JobStatus, str | None] | None:
        rid = job.response_id
        if job.fails:
            # The seed: "A long-running inference with duration greater than 1 minute
            # may occasionally encounter an error."
            await asyncio.sleep(self._config().faults.job_failure_after_s)
            return JobStatus.FAILED, "The inference ran too long and failed; resubmit the request."
        raw = self._inputs.pop(rid, None)
        if raw is not None:
            self._inputs_bytes -= len(raw)
        else:
            raw = await self._call(self.store.input, rid)
        if raw is None:
            return (
                JobStatus.FAILED,
                "The job's input is gone from the job store; resubmit the request.",
            )
        special = self.renderers.get(job.engine)
        if special is not None:
            work = special(raw, control)
        else:
            work = self._render(ImageGenerationRequest.from_wire(_json(raw), job.engine), control)
        del raw
        try:
            try:
                body = await work
            finally:
                await free()
        except JobCancelled:
            return JobStatus.CANCELLED, CANCELLED_MESSAGE
        except JobLost as exc:
            return JobStatus.FAILED, str(exc)
        except asyncio.CancelledError:
            if not self._accepting:
                await self._call(
                    self.store.swap, rid, lambda j: self._if_mine(j, lambda: _released(j))
                )
                return None
            raise
        except Exception as exc:  # a renderer bug must not leave the job running forever
            return JobStatus.FAILED, _failure(exc)
        await self._call(self.store.put_result, rid, body)
        return JobStatus.COMPLETED, None

    async def _renew(self, response_id: str, control: JobControl) -> None:
        lease = self._config().async_lease_s

        def change(job: StoredJob) -> StoredJob | None:
            if job.cancel_requested:
                control.cancel.set()
            return self._if_mine(
                job,
                lambda: job.evolve(lease_until=time.time() + lease, progress=control.progress),
            )

        while True:
            await asyncio.sleep(lease / 3)
            with contextlib.suppress(Exception):  # the next round tries again
                await self._call(self.store.swap, response_id, change)

    async def _drop_inputs_forever(self) -> None:
        """Delete finished jobs' inputs in batches: a crash before leaves them to expiry."""
        while True:
            await asyncio.sleep(_DROP_INTERVAL_S)
            with contextlib.suppress(Exception):  # the expiry sweep deletes what is left
                await self._drop_inputs()

    async def _drop_inputs(self) -> None:
        if self._finished:
            batch, self._finished = self._finished, []
            await self._call(self.store.finish_files, *batch)

    # ---- recovery and expiry ----------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a store hiccup: the next round tries again
                await self.sweep()
            await asyncio.sleep(self._config().async_sweep_interval_s)

    async def sweep(self) -> None:
        """Queue pending jobs, retry or fail lost ones, delete expired ones.

        Reads only the records of jobs with an input (not finished) and of finished
        ones whose record is older than ``result_ttl_s`` (may have expired): a sweep of a
        store of finished jobs is one listing, however many there are.
        """
        queue, leftover = await self._call(self._sweep_store)
        self._finished.extend(leftover)
        for rid in queue:
            self._enqueue(rid)

    def _sweep_store(self) -> tuple[list[str], list[str]]:
        """The pending jobs to queue, and finished ones whose input is still there."""
        config = self._config()
        now = time.time()
        queue: list[str] = []
        leftover: list[str] = []
        expired = 0
        for rid, modified, open_ in list(self.store.listing()):
            if not open_ and modified.timestamp() + config.result_ttl_s > now:
                continue  # finished (its input is gone) and not old enough to expire
            if rid in self._running or rid in self._tasks:
                continue  # running or queued here: this process tends it
            job = self.store.read(rid)
            if job is None:
                continue
            if job.finished:
                if job.expired(now, config.result_ttl_s) and self.store.delete(rid):
                    expired += 1
                elif open_:
                    leftover.append(rid)  # its input outlived a crash: drop it
                continue
            if job.status is JobStatus.RUNNING and (job.lease_until or 0) < now:
                job = self.store.swap(rid, _lost) or job
            if job.status is JobStatus.PENDING:
                queue.append(rid)
        if expired:
            self._stats.async_expired += expired
        self.store.forget_expired_keys(config.result_ttl_s)
        return queue, leftover

    async def counts(self) -> dict[str, int]:
        """Jobs in the store by status (a read of every record: for the stats page)."""
        await self.sweep()
        return await self._call(self._count_store)

    def _count_store(self) -> dict[str, int]:
        by_status = {s.value: 0 for s in JobStatus if s is not JobStatus.UNKNOWN}
        for rid, _modified, _open in list(self.store.listing()):
            job = self.store.cached(rid, self.holder, POLL_STALE_S) or self.store.read(rid)
            if job is not None:
                by_status[job.status.value] += 1
        return by_status

    # ---- stopping ---------------------------------------------------------------------

    async def close(self) -> None:
        """Stop accepting; give running jobs ``shutdown_grace_s``, then release them."""
        self._accepting = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        running = [self._tasks[rid] for rid in self._running if rid in self._tasks]
        for rid, task in list(self._tasks.items()):
            if rid not in self._running:
                task.cancel()  # still queued here: it stays pending in the store
        if running:
            await asyncio.wait(running, timeout=self._config().shutdown_grace_s)
        for rid, control in list(self._running.items()):
            # The task first, so that the job is released (back to pending), not
            # cancelled; then the flag, so that a diffusers render stops at its next step.
            if (left := self._tasks.get(rid)) is not None:
                left.cancel()
            control.cancel.set()
        leftover = [t for t in self._tasks.values() if not t.done()]
        if leftover:
            await asyncio.wait(leftover, timeout=5)
        if self._dropper is not None:
            self._dropper.cancel()
        with contextlib.suppress(Exception):
            await self._drop_inputs()
        self._io.shutdown(wait=True)


def _ended(job: StoredJob, status: JobStatus, error: str | None) -> StoredJob:
    return job.evolve(
        status=status,
        error=error,
        finished_at=time.time(),
        holder=None,
        lease_until=None,
        progress=None if status is not JobStatus.COMPLETED else job.progress,
    )


def _released(job: StoredJob) -> StoredJob:
    """Back to pending for the next server; a graceful stop does not count as an attempt."""
    return job.evolve(
        status=JobStatus.PENDING,
        attempts=max(0, job.attempts - 1),
        holder=None,
        lease_until=None,
        progress=None,
    )


def _lost(job: StoredJob) -> StoredJob | None:
    """A running job whose holder stopped renewing its lease: its process is gone."""
    if job.status is not JobStatus.RUNNING or (job.lease_until or 0) >= time.time():
        return None
    if job.attempts >= MAX_ATTEMPTS:
        return _ended(job, JobStatus.FAILED, RESTART_MESSAGE)
    return job.evolve(status=JobStatus.PENDING, holder=None, lease_until=None, progress=None)


def _failure(exc: BaseException) -> str:
    return f"The inference failed: {type(exc).__name__}."


def _json(raw: bytes) -> Any:
    import json

    return json.loads(raw)
