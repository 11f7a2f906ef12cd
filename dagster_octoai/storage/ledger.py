"""A durable ledger of async jobs: nothing paid for is forgotten when a process dies.

Every async job gets one small JSON record, written *before* the step that
submitted it returns, and an ``intent`` record written before the POST is sent.
The ledger, not a sensor cursor, is the source of truth: a sensor can lose its
cursor, a run can crash, and the ledger still lists every job that has to be
polled, fetched and persisted.

Layout under the ledger's prefix, on a :class:`~dagster_octoai.storage.backends.StorageBackend`
(a local directory or an S3 bucket)::

    jobs/<job_id>.json              the record (atomic replace on every change)
    open/<created_ms>-<job_id>      an empty marker per job that still needs work
    responses/<response_id>         the job id of a response id (for the fetch asset)

Listing the ``open/`` markers is what a sensor tick does to find work: one
directory listing (or ten S3 list calls at 10,000 jobs) and no record reads. The
markers sort by creation time, so a sensor walks the jobs oldest first. A
marker is created before a record enters an open state and removed after a
record is closed, so a crash between the two writes leaves at worst a stale
marker, which the next listing reader removes, never an open job without one.

Every record write is a compare-and-swap: it names the version of the record it
was computed from (the S3 ETag, ``If-Match``; ``If-None-Match: *`` for a new
record; a locked compare-and-rename on a local directory) and raises
:class:`~dagster_octoai.storage.backends.ConflictError` when another writer got
there first. Claiming a submission (:meth:`JobLedger.record_intent`) is such a
write, so of any number of sensor ticks or runs that race to submit or resubmit
one job, exactly one POSTs it; the others see the conflict and leave it alone.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from ..api._wait import AnyJob
from ..api.errors import ConflictError, StorageError
from ..api.models import AsyncJob, ImageGenerationRequest
from ..api.video import SVD_ENGINE, VideoGenerationRequest, VideoJob
from .backends import StorageBackend

if TYPE_CHECKING:
    from ..api.client import OctoAIClient

__all__ = [
    "ConflictError",
    "JobKind",
    "JobLedger",
    "JobRecord",
    "JobRequest",
    "JobState",
    "job_id_for",
    "submit_request",
]

logger = logging.getLogger("dagster_octoai.storage")

RECORD_VERSION = 1

#: What a job makes: images (``POST /generate/{engine}``) or videos (``POST /generate/svd``).
JobKind = Literal["image", "video"]
#: The request of a job of either kind.
JobRequest = ImageGenerationRequest | VideoGenerationRequest


class JobState(str, enum.Enum):
    """Where an async job is in its life.

    ``intent``: the POST is about to be sent (or was, and its answer was lost);
    ``submitted``: the service accepted it; ``pending`` / ``running``: as polled;
    ``completed``: the result is ready and a persist run was requested;
    ``persisted``: the images are stored; ``failed`` / ``expired``: given up on
    after the allowed resubmissions (final, reported as a failed run);
    ``cancelled``: cancelled on purpose (its run was terminated, or someone cancelled it
    on the server): final, never resubmitted by the sensor.
    """

    INTENT = "intent"
    SUBMITTED = "submitted"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    PERSISTED = "persisted"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Nothing more will happen to a job in a final state."""
        return self in _FINAL_STATES


_FINAL_STATES = frozenset(
    {JobState.PERSISTED, JobState.FAILED, JobState.EXPIRED, JobState.CANCELLED}
)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobRecord(BaseModel):
    """One async job as the ledger stores it: enough to poll, fetch or resubmit it.

    ``request`` is the full wire body (``request.to_wire()``) and ``engine`` its
    endpoint; the token is never part of either. ``attempts`` counts the POSTs
    made for this job (1 + resubmissions); ``previous_response_ids`` lists the
    response ids of attempts that expired or failed. ``revision`` counts the
    writes of the record and ``write_id`` is unique per write, so no two writes
    ever store the same bytes (a compare-and-swap on content can then never be
    fooled by a record that changed and changed back).

    A record read from the ledger remembers the version it was read at
    (:attr:`stored_version`; ``evolve`` keeps it): saving a changed copy succeeds
    only while the stored record is still that version.

    Examples:
        >>> req = ImageGenerationRequest(prompt="a fox", seed=1)
        >>> rec = JobRecord.new(req, asset_key="images", partition_key=None, job_id="j1")
        >>> rec.state.value, rec.attempts, rec.request_model().seed
        ('intent', 0, 1)
    """

    model_config = ConfigDict(frozen=True)

    version: int = RECORD_VERSION
    job_id: str
    mode: Literal["sensor", "blocking"] = "sensor"
    kind: JobKind = Field(
        default="image",
        description="What the job makes (records written before videos existed are images).",
    )
    state: JobState = JobState.INTENT
    engine: str
    request: dict[str, Any]
    request_fingerprint: str
    asset_key: str = Field(description="Target asset key, '/'-joined.")
    partition_key: str | None = Field(
        default=None, description="Partition of the submitting asset."
    )
    run_id: str | None = Field(default=None, description="Run that submitted the job.")
    created_at: datetime = Field(default_factory=_utcnow)
    updated_at: datetime = Field(default_factory=_utcnow)
    submitted_at: datetime | None = None
    response_id: str | None = None
    poll_url: str | None = None
    response_url: str | None = None
    attempts: int = 0
    previous_response_ids: list[str] = Field(default_factory=list)
    raw_status: str | None = None
    last_polled_at: datetime | None = None
    running_since: datetime | None = None
    completed_at: datetime | None = None
    persisted_at: datetime | None = None
    persist_runs: int = 0
    error: str | None = None
    revision: int = 0
    write_id: str | None = None
    claimed_by: str | None = Field(
        default=None,
        description="'host:pid' of the process that wrote the current intent (who is submitting).",
    )

    _version: str | None = PrivateAttr(default=None)

    @property
    def idempotency_key(self) -> str:
        """The ``Idempotency-Key`` of this job's next POST.

        The same for every POST that replaces the same response (a retry after a lost
        answer gets the job the first POST made, unpaid); new once a response the server
        gave up (expired or failed) is being replaced. The record's creation time is
        part of it: a job id is a digest of the request, and two ledgers (or a job made
        again after it ended) must not share a key.
        """
        seed = "\0".join(
            [
                self.job_id,
                self.created_at.isoformat(),
                self.response_id or "",
                str(len(self.previous_response_ids)),
            ]
        )
        return "dagster-octoai-" + hashlib.sha256(seed.encode()).hexdigest()[:40]

    @property
    def stored_version(self) -> str | None:
        """The version of the stored record this one was read (or derived) from; ``None``: new."""
        return self._version

    def at_version(self, version: str | None) -> JobRecord:
        """This record, to be saved over the stored version ``version`` (``None``: a new record)."""
        copy = self.model_copy()
        copy._version = version
        return copy

    @classmethod
    def new(
        cls,
        request: JobRequest,
        *,
        asset_key: str,
        partition_key: str | None,
        job_id: str,
        mode: Literal["sensor", "blocking"] = "sensor",
        run_id: str | None = None,
    ) -> JobRecord:
        """A fresh ``intent`` record for a request that is about to be submitted."""
        kind: JobKind = "video" if isinstance(request, VideoGenerationRequest) else "image"
        engine = request.engine.value if isinstance(request, ImageGenerationRequest) else SVD_ENGINE
        return cls(
            job_id=job_id,
            mode=mode,
            kind=kind,
            engine=engine,
            request=request.to_wire(),
            request_fingerprint=request.fingerprint(),
            asset_key=asset_key,
            partition_key=partition_key,
            run_id=run_id,
        )

    def request_model(self) -> JobRequest:
        """The request, rebuilt exactly as it was sent (same parameters, same seed)."""
        if self.kind == "video":
            return VideoGenerationRequest.from_wire(self.request)
        return ImageGenerationRequest.from_wire(self.request, self.engine)

    def job(self) -> AnyJob:
        """The job of the current attempt, an :class:`AsyncJob` or a :class:`VideoJob` by kind.

        Raises:
            ValueError: it was never submitted (no response id yet).
        """
        if self.response_id is None or self.poll_url is None:
            raise ValueError(f"job {self.job_id} has no response_id yet (state {self.state.value})")
        request = self.request_model()
        submitted_at = self.submitted_at or self.created_at
        if isinstance(request, VideoGenerationRequest):
            return VideoJob(
                response_id=self.response_id,
                poll_url=self.poll_url,
                request=request,
                submitted_at=submitted_at,
            )
        return AsyncJob(
            response_id=self.response_id,
            poll_url=self.poll_url,
            request=request,
            submitted_at=submitted_at,
        )

    def async_job(self) -> AsyncJob:
        """The :class:`AsyncJob` of an image job's current attempt (see :meth:`job`).

        Raises:
            ValueError: it was never submitted, or it is a video job.
        """
        job = self.job()
        if not isinstance(job, AsyncJob):
            raise ValueError(f"job {self.job_id} is a {self.kind} job; use job() for its VideoJob")
        return job

    def evolve(self, **changes: Any) -> JobRecord:
        """A copy with ``changes`` applied (records are immutable)."""
        return self.model_copy(update=changes)

    def details(self) -> dict[str, Any]:
        """What a failure report or a tick log shows about the job (no image payloads)."""
        return {
            "job_id": self.job_id,
            "state": self.state.value,
            "response_id": self.response_id,
            "previous_response_ids": list(self.previous_response_ids),
            "attempts": self.attempts,
            "engine": self.engine,
            "asset_key": self.asset_key,
            "partition_key": self.partition_key,
            "submitted_at": self.submitted_at.isoformat() if self.submitted_at else None,
            "raw_status": self.raw_status,
            "error": self.error,
            "request": self.request_model().summary(),
        }

    def claimant_alive(self) -> bool | None:
        """Whether the process that claimed the current submission is still running.

        ``True`` or ``False`` for a process of this host; ``None`` when it ran on
        another host (or is not recorded): then only its run's status can tell.
        """
        host, _, pid = (self.claimed_by or "").rpartition(":")
        if not host or not pid.isdigit() or host != socket.gethostname():
            return None
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, owned by another user
        return True

    @property
    def open_marker(self) -> str:
        """The name of this job's ``open/`` marker: sorts by creation time."""
        return f"{int(self.created_at.timestamp() * 1000):013d}-{self.job_id}"


def job_id_for(
    asset_key: str,
    partition_key: str | None,
    request: JobRequest,
    occurrence: int = 0,
    scope: str | None = None,
) -> str:
    """A deterministic job id: the same asset, partition, request and scope give the same id.

    ``occurrence`` tells apart identical requests in one batch; ``scope`` (e.g. the
    root run id) keeps random-seed requests of different runs apart, so that a
    retry of a run finds its own jobs while a new run pays for new images.

    Examples:
        >>> req = ImageGenerationRequest(prompt="a fox", seed=1)
        >>> job_id_for("images", "p1", req) == job_id_for("images", "p1", req)
        True
        >>> job_id_for("images", "p1", req) == job_id_for("images", "p2", req)
        False
    """
    canon = json.dumps(
        [asset_key, partition_key, request.fingerprint(), occurrence, scope],
        separators=(",", ":"),
    )
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def submit_request(client: OctoAIClient, request: JobRequest, *, idempotency_key: str) -> AnyJob:
    """POST a job's request as an async job, by its kind (images or video)."""
    if isinstance(request, VideoGenerationRequest):
        return client.submit_video(request, idempotency_key=idempotency_key)
    return client.submit(request, idempotency_key=idempotency_key)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _safe_name(value: str) -> str:
    # Response ids come from the server: never let one escape the ledger's root.
    if _SAFE_NAME.match(value) and ".." not in value:
        return value
    return "sha256-" + hashlib.sha256(value.encode()).hexdigest()


# ---- the ledger -------------------------------------------------------------------------


class JobLedger:
    """Durable job records on a :class:`~dagster_octoai.storage.backends.StorageBackend`.

    The image store's object store: its conditional writes (the compare-and-swap of every
    record), its locks and its error mapping (every S3 failure a ``StorageError`` naming
    the object). Objects live under ``prefix``: ``jobs/<job id>.json`` (the records),
    ``open/<marker>`` (the jobs still to poll) and ``responses/<response id>`` (the job
    of each response id). A local ledger is a :class:`LocalBackend` with ``fsync=True``.

    Examples:
        >>> import tempfile
        >>> from dagster_octoai.storage.backends import LocalBackend
        >>> ledger = JobLedger(LocalBackend(tempfile.mkdtemp()))
        >>> req = ImageGenerationRequest(prompt="a fox", seed=1)
        >>> rec = ledger.record_intent(
        ...     JobRecord.new(req, asset_key="images", partition_key=None, job_id="j1"))
        >>> [ledger.job_id_of_marker(m) for m in ledger.list_open()]
        ['j1']
    """

    def __init__(
        self,
        backend: StorageBackend,
        prefix: str = "",
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.backend = backend
        self.prefix = prefix.strip("/")
        self.clock = clock

    # -- objects --

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _write(self, name: str, data: bytes) -> None:
        self.backend.put(self._key(name), data, "application/json", {})

    def _delete(self, name: str) -> None:
        self.backend.delete([self._key(name)])

    def _list(self, folder: str) -> list[str]:
        """Names of the objects directly in ``folder``, sorted (temp files left out)."""
        head = self._key(folder) + "/"
        names = (info.key[len(head) :] for info in self.backend.list(head))
        return sorted(n for n in names if n and "/" not in n and not n.startswith("."))

    # -- reading --

    def get(self, job_id: str) -> JobRecord | None:
        """The record of ``job_id`` (knowing the version it was read at), or ``None``.

        Raises:
            StorageError: the stored record is not a valid record (names the object).
        """
        key = self._key(self._record_key(job_id))
        got = self.backend.get_versioned(key)
        if got is None:
            return None
        try:
            record = JobRecord.model_validate_json(got.data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}"
                for e in exc.errors()[:3]
            )
            raise StorageError(
                f"{self.backend.uri(key)} is not a valid job record ({problems}); restore it "
                "from a backup, or delete it to forget the job (its images would then be "
                "paid for again)"
            ) from None
        return record.at_version(got.version)

    @staticmethod
    def _record_key(job_id: str) -> str:
        return f"jobs/{_safe_name(job_id)}.json"

    def find_by_response_id(self, response_id: str) -> JobRecord | None:
        """The job that has (or had) ``response_id``, or ``None``."""
        raw = self.backend.get_or_none(self._key(f"responses/{_safe_name(response_id)}"))
        if raw is None:
            return None
        record = self.get(raw.decode())
        if record is None:
            return None
        if response_id != record.response_id and response_id not in record.previous_response_ids:
            return None
        return record

    def list_open(self) -> list[str]:
        """Open markers, oldest first: the jobs that still need polling, fetching or reporting."""
        return self._list("open")

    @staticmethod
    def job_id_of_marker(marker: str) -> str:
        """The job id in an ``open/`` marker name."""
        return marker.split("-", 1)[1]

    def iter_records(self) -> Iterator[JobRecord]:
        """Every record, open or final (reads them all: for reports and tests, not ticks)."""
        for name in self._list("jobs"):
            if name.endswith(".json"):
                record = self.get(name[: -len(".json")])
                if record is not None:
                    yield record

    def uri(self, job_id: str) -> str:
        """Where the record of ``job_id`` lives."""
        return self.backend.uri(self._key(self._record_key(job_id)))

    # -- writing --

    def save(self, record: JobRecord, *, marker_exists: bool = False) -> JobRecord:
        """Write ``record`` if the stored one is still the version it was read at.

        A record from :meth:`get` (or evolved from one) replaces that version
        only; a :meth:`JobRecord.new` one is created only if the job has no record
        yet. The ``open/`` marker is kept in step with the record's state.
        ``marker_exists=True`` says the caller has just seen the record's open marker
        (a sensor tick walks the markers), which saves rewriting it: on a local ledger
        that is one fsync'd write of two per poll that changes a job's state.

        Returns:
            The record as stored (its new version, revision and write id).

        Raises:
            ConflictError: another writer changed the record first; nothing was
                written. Read it again (or use :meth:`update`).
        """
        stored = record.evolve(
            updated_at=self.clock(), revision=record.revision + 1, write_id=uuid.uuid4().hex
        )
        marker = f"open/{stored.open_marker}"
        if not stored.state.is_final and not marker_exists:
            # Marker first: an open record never lacks a marker, even after a crash. A
            # writer that then loses the race leaves at worst a stale marker (its
            # creation time may differ from the winner's), which ticks discard.
            self._write(marker, b"")
        version = self.backend.put_if(
            self._key(self._record_key(stored.job_id)),
            stored.model_dump_json().encode(),
            "application/json",
            {},
            record.stored_version,
        )
        if stored.state.is_final:
            self._delete(marker)
        return stored.at_version(version)

    def update(
        self,
        record: JobRecord,
        change: Callable[[JobRecord], JobRecord | None],
        *,
        attempts: int = 5,
    ) -> JobRecord | None:
        """Save ``change(record)``, re-reading and re-applying ``change`` on a lost race.

        ``change`` gets the record as it now is and returns the record to store, or
        ``None`` when the change no longer applies (nothing is written).

        Returns:
            The stored record, or ``None`` when ``change`` declined.

        Raises:
            ConflictError: the race was lost ``attempts`` times in a row.
        """
        current = record
        for _ in range(attempts):
            changed = change(current)
            if changed is None:
                return None
            try:
                return self.save(changed)
            except ConflictError:
                latest = self.get(record.job_id)
                if latest is None:
                    raise
                current = latest
        raise ConflictError(
            f"{self.uri(record.job_id)} kept changing under {attempts} attempts to update it; "
            "nothing was written"
        )

    def record_intent(self, record: JobRecord, *, replaces: JobRecord | None = None) -> JobRecord:
        """Claim the next submission of a job: write its ``intent`` before the POST is sent.

        This is the compare-and-swap that makes a submission happen once: of any
        number of ticks or runs that read the same record and race to (re)submit
        it, one writes the intent and the others get :class:`ConflictError` and
        must not POST. A new job (``attempts == 0``) is created only if it has no
        record yet, unless ``replaces`` names the final record it supersedes.

        If the process dies after the POST and before :meth:`record_submitted`, the
        record stays in ``intent``: detectable, but the response id is unknown (the
        API has no way to look a job up without it), so it can only be resubmitted.

        Raises:
            ConflictError: another writer claimed or changed the job first.
        """
        if record.attempts == 0:
            # A new job: its open marker sorts by the ledger's clock (tests move it).
            record = record.evolve(created_at=self.clock())
        if replaces is not None:
            record = record.at_version(replaces.stored_version)
        return self.save(
            record.evolve(
                state=JobState.INTENT,
                attempts=record.attempts + 1,
                error=None,
                raw_status=None,
                claimed_by=f"{socket.gethostname()}:{os.getpid()}",
            )
        )

    def record_submitted(self, intent: JobRecord, job: AnyJob) -> JobRecord:
        """Record the service's answer to the submission ``intent`` claimed.

        The response id is never lost: if the record moved on after the intent (a
        tick took the intent for a lost submission and resubmitted it, or gave the
        job up), the answer joins ``previous_response_ids`` and a warning says the
        job was paid for twice.
        """
        self._write(f"responses/{_safe_name(job.response_id)}", intent.job_id.encode())

        def apply(current: JobRecord) -> JobRecord | None:
            if current.write_id == intent.write_id or (
                current.state is JobState.INTENT
                and current.attempts == intent.attempts
                and current.response_id == intent.response_id
            ):
                previous = list(current.previous_response_ids)
                if current.response_id and current.response_id != job.response_id:
                    previous.append(current.response_id)
                return current.evolve(
                    state=JobState.SUBMITTED,
                    response_id=job.response_id,
                    poll_url=job.poll_url,
                    response_url=None,
                    submitted_at=job.submitted_at,
                    previous_response_ids=previous,
                    running_since=None,
                    completed_at=None,
                    raw_status=None,
                    error=None,
                )
            known = {current.response_id, *current.previous_response_ids}
            if job.response_id in known:
                return None
            logger.warning(
                "job %s: submission %d was answered with response %s after the record moved "
                "on (now %s, attempt %d); it is kept in previous_response_ids, but this job "
                "was paid for twice",
                intent.job_id,
                intent.attempts,
                job.response_id,
                current.state.value,
                current.attempts,
            )
            return current.evolve(
                previous_response_ids=[*current.previous_response_ids, job.response_id]
            )

        saved = self.update(intent, apply)
        if saved is not None:
            return saved
        latest = self.get(intent.job_id)
        assert latest is not None  # apply declined only after reading it
        return latest

    def discard_marker(self, marker: str) -> None:
        """Remove a stale ``open/`` marker (its record is final or gone)."""
        self._delete(f"open/{marker}")

    def now(self) -> datetime:
        """The ledger's clock (injectable for tests)."""
        return self.clock()
