"""Async jobs that outlive the process: records, inputs and results in a storage backend.

One :class:`JobStore` over one :class:`~dagster_octoai.storage.backends.StorageBackend`
(the storage layer's, with its conditional writes): a local directory
(``dagster-octoai serve --state-dir DIR``), S3 (``--jobs-url s3://bucket/prefix``, shared
by every frontend and machine), or memory (a test that asks for it). Under the store's
prefix:

```
owner-key                      the key owner hashes are made with (shared, made once)
jobs/<response_id>/record.json the job's StoredJob: owner, status, times, error (CAS)
jobs/<response_id>/input.json  the request's JSON body, until the job ends
jobs/<response_id>/result.json the answer body of a completed job
idempotency/<digest>.json      an Idempotency-Key's first response id and body digest
```

Every status change is a compare-and-swap of ``record.json`` (``put_if`` with the
version read), so of two frontends that claim, complete or expire one job, one wins and
the other sees that it lost. A pending job's input waits in the store, not in memory,
and is dropped when the job ends (it is kept while the job runs only so that a job whose
server died can run again); the record holds the request without its images (their
sizes and hashes). A finished job is nothing but its files.

Each store keeps the records this process last wrote or read finished (at most
``4096``, about 1 KiB each, never an input or a result): a compare-and-swap tries the
kept version before reading, and a poll is answered from it (:meth:`JobStore.cached`)
when nothing another process may do can have changed what it shows: a finished job
(final), a job this process holds under a live lease (only the holder changes its
status), or a record written here less than ``stale_s`` ago (a pending job another
frontend may have claimed since: shown as pending that long at most).

Response ids carry the second they were made and a keyed check, so that an id whose
files are gone can be told apart: made here and past its time (expired) or never made
here (unknown).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api.errors import ConflictError, ObjectNotFoundError, StorageError
from ..api.models import JobStatus
from ..storage.backends import LocalBackend, ObjectInfo, StorageBackend, Versioned

__all__ = [
    "RESTART_MESSAGE",
    "JobStore",
    "MemoryBackend",
    "StoredJob",
    "open_job_store",
]

#: The error of a job whose server stopped while it ran, once it may not run again.
RESTART_MESSAGE = "the server stopped while this job ran; resubmit the request"
#: A job is run at most this many times (a first run and one retry after a lost server).
MAX_ATTEMPTS = 2

_JSON = "application/json"
_CAS_ROUNDS = 16
# Records (and versions) of this process's last writes kept for compare-and-swap.
_WRITTEN_KEPT = 4096
#: Statuses a job ends in: nothing changes it afterwards.
FINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class StoredJob(BaseModel):
    """One async job as persisted (``record.json``); parsed on read, a bad one is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    response_id: str
    owner: str
    engine: str
    status: JobStatus = JobStatus.PENDING
    submitted_at: float = Field(description="Wall-clock seconds since the epoch.")
    started_at: float | None = None
    finished_at: float | None = None
    #: Times the job was claimed to run (a retry after a lost server is the second).
    attempts: int = 0
    error: str | None = None
    #: The request without image payloads (their sizes and hashes).
    request: dict[str, Any] | None = None
    #: An injected failure (FaultConfig.job_failure), drawn at submission.
    fails: bool = False
    #: Which server process runs it, and until when its lease holds (wall clock).
    holder: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False
    #: (step, steps) of a running diffusers job.
    progress: tuple[int, int] | None = None
    #: Random per write: two writers of the same change write different bytes, so S3's
    #: "a refused retry that holds my bytes landed" rule never lets both of them win.
    write_id: str = ""

    def evolve(self, **changes: Any) -> StoredJob:
        return self.model_copy(update=changes)

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def expired(self, now: float, ttl_s: float) -> bool:
        return self.finished_at is not None and now >= self.finished_at + ttl_s

    def readable_by(self, owner: str, admin: bool) -> bool:
        return admin or hmac.compare_digest(self.owner, owner)


class IdempotencyEntry(BaseModel):
    """What an ``Idempotency-Key`` was first used for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    response_id: str
    body_digest: str
    created_at: float


class MemoryBackend(StorageBackend):
    """Objects in a dict, for tests that ask for an in-memory job store: lost with the process."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, str, datetime]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "MemoryBackend()"

    def uri(self, key: str) -> str:
        return f"memory:///{key}"

    def key_for_uri(self, uri: str) -> str | None:
        return uri[len("memory:///") :] if uri.startswith("memory:///") else None

    def put(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]) -> None:
        with self._lock:
            self._objects[key] = (data, secrets.token_hex(8), datetime.now(timezone.utc))

    def copy(
        self, source_key: str, key: str, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        self.put(key, self.get(source_key), content_type, metadata)

    def get(self, key: str) -> bytes:
        found = self._objects.get(key)
        if found is None:
            raise ObjectNotFoundError(f"no object at {self.uri(key)}")
        return found[0]

    def delete(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._objects.pop(key, None)

    def check(self) -> None:
        return None

    def check_key(self, key: str) -> None:
        return None

    def get_versioned(self, key: str) -> Versioned | None:
        found = self._objects.get(key)
        return None if found is None else Versioned(found[0], found[1])

    def put_if(
        self,
        key: str,
        data: bytes,
        content_type: str,
        metadata: Mapping[str, str],
        expected: str | None,
    ) -> str:
        with self._lock:
            found = self._objects.get(key)
            if (None if found is None else found[1]) != expected:
                raise ConflictError(f"{self.uri(key)} changed since it was read; nothing written")
            version = secrets.token_hex(8)
            self._objects[key] = (data, version, datetime.now(timezone.utc))
            return version

    def delete_if(self, key: str, expected: str) -> bool:
        with self._lock:
            found = self._objects.get(key)
            if found is None or found[1] != expected:
                return False
            del self._objects[key]
            return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._lock:
            items = [(k, v) for k, v in self._objects.items() if k.startswith(prefix)]
        for key, (data, _version, modified) in items:
            yield ObjectInfo(key, len(data), modified)


class JobStore:
    """Job records, inputs, results and idempotency keys under ``prefix`` of ``backend``.

    Blocking calls (a file or an S3 request each): the server runs them in a thread.

    Examples:
        >>> store = JobStore(MemoryBackend())
        >>> job = store.create("alice", "sdxl", b'{"prompt":"a fox"}')
        >>> store.read(job.response_id).status.value
        'pending'
        >>> store.swap(job.response_id, lambda j: j.evolve(status=JobStatus.CANCELLED)).status.value
        'cancelled'
        >>> store.origin(job.response_id), store.origin("0000000000-0000")
        ('ours', 'unknown')
    """

    def __init__(self, backend: StorageBackend, prefix: str = "") -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.backend = backend
        self.prefix = prefix
        self.durable = not isinstance(backend, MemoryBackend)
        self._id_key = self._shared_key()
        # The record, version and monotonic time of this process's last write (or read of
        # a finished record) per job: a compare-and-swap tries them first and reads the
        # store only when another writer came between; a poll may be answered from them.
        self._written: OrderedDict[str, tuple[StoredJob, str, float]] = OrderedDict()
        self._written_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JobStore({self.backend!r}, prefix={self.prefix!r})"

    def describe(self) -> str:
        """Where the jobs are, for a start-up line (no credentials)."""
        return self.backend.uri(self.prefix)

    # ---- keys and the shared secret -------------------------------------------------

    def _key(self, response_id: str, name: str) -> str:
        return f"{self.prefix}jobs/{response_id}/{name}.json"

    def _shared_key(self) -> bytes:
        """The store's secret, made by whichever server starts first and read by the others."""
        key = f"{self.prefix}owner-key"
        current = self.backend.get_or_none(key)
        if current is None:
            # Another server may make it first: then theirs is used.
            with contextlib.suppress(ConflictError):
                self.backend.put_if(
                    key, secrets.token_bytes(32), "application/octet-stream", {}, None
                )
            current = self.backend.get(key)
        if len(current) != 32:
            raise StorageError(
                f"{self.backend.uri(key)} is not a 32-byte key; delete it to make one"
            )
        return current

    @property
    def owner_key(self) -> bytes:
        """The key of owner hashes: the same for every server on this store, across restarts."""
        return hmac.new(self._id_key, b"owner", hashlib.sha256).digest()

    def new_response_id(self) -> str:
        """128 random bits, the second it was made, and a keyed check of both."""
        stamp = f"{int(time.time()):08x}"
        rand = secrets.token_hex(16)
        check = hmac.new(self._id_key, (stamp + rand).encode(), hashlib.sha256).hexdigest()[:8]
        digits = stamp + rand + check
        return f"{digits[:10]}-{digits[10:]}"

    def origin(self, response_id: str) -> Literal["ours", "unknown"]:
        """Whether this store made ``response_id`` (then a missing job has expired)."""
        digits = response_id.replace("-", "", 1)
        if len(digits) != 48 or response_id[10:11] != "-":
            return "unknown"
        stamp, rand, check = digits[:8], digits[8:40], digits[40:]
        want = hmac.new(self._id_key, (stamp + rand).encode(), hashlib.sha256).hexdigest()[:8]
        return "ours" if hmac.compare_digest(want, check) else "unknown"

    # ---- records --------------------------------------------------------------------

    def create(
        self,
        owner: str,
        engine: str,
        body: bytes,
        summary: dict[str, Any] | None = None,
        fails: bool = False,
        response_id: str | None = None,
    ) -> StoredJob:
        """A new pending job: its input first, then its record (the commit point).

        ``summary`` is the request without its images (what the record keeps).
        ``response_id`` (one from :meth:`new_response_id`) names it ahead, for an
        idempotency key; if that job exists already, it is returned as it is.
        """
        job = StoredJob(
            response_id=response_id or self.new_response_id(),
            owner=owner,
            engine=engine,
            submitted_at=time.time(),
            request=summary,
            fails=fails,
        )
        if response_id is not None and (found := self.read(response_id)) is not None:
            return found
        self.backend.put(self._key(job.response_id, "input"), body, _JSON, {})
        try:
            return self._write(job, None)
        except ConflictError:
            if (found := self.read(job.response_id)) is None:
                raise
            return found

    def read_versioned(self, response_id: str) -> tuple[StoredJob, str] | None:
        if self.origin(response_id) != "ours":
            return None  # never a storage call for an id this store did not make
        found = self.backend.get_versioned(self._key(response_id, "record"))
        if found is None:
            return None
        try:
            return StoredJob.model_validate_json(found.data), found.version
        except ValidationError as exc:
            raise StorageError(
                f"{self.backend.uri(self._key(response_id, 'record'))} is not a job record: "
                f"{exc.errors(include_url=False)[0]['msg']}"
            ) from None

    def read(self, response_id: str) -> StoredJob | None:
        found = self.read_versioned(response_id)
        if found is None:
            return None
        if found[0].finished:
            self._keep(*found)  # final: a later poll needs no read
        return found[0]

    def cached(self, response_id: str, holder: str, stale_s: float) -> StoredJob | None:
        """The kept record of a job when it may be served without a read, else None.

        Finished: final. Running under ``holder`` with its lease live: only the holder
        changes its status (another process may set ``cancel_requested``, which the
        holder's next renewal reads). Else a record kept less than ``stale_s`` ago.
        """
        with self._written_lock:
            kept = self._written.get(response_id)
        if kept is None:
            return None
        job, _version, at = kept
        if job.finished or time.monotonic() - at < stale_s:
            return job
        if (
            job.status is JobStatus.RUNNING
            and job.holder == holder
            and (job.lease_until or 0) > time.time()
        ):
            return job
        return None

    def _write(self, job: StoredJob, expected: str | None) -> StoredJob:
        """Write ``job`` if its record is still at version ``expected``: what was written."""
        job = job.evolve(write_id=secrets.token_hex(8))
        data = job.model_dump_json().encode()
        key = self._key(job.response_id, "record")
        try:
            version = self.backend.put_if(key, data, _JSON, {}, expected)
        except ConflictError:
            self._forget_written(job.response_id)
            raise
        self._keep(job, version)
        return job

    def _keep(self, job: StoredJob, version: str) -> None:
        with self._written_lock:
            self._written[job.response_id] = (job, version, time.monotonic())
            self._written.move_to_end(job.response_id)
            while len(self._written) > _WRITTEN_KEPT:
                self._written.popitem(last=False)

    def _forget_written(self, response_id: str) -> None:
        with self._written_lock:
            self._written.pop(response_id, None)

    def swap(
        self, response_id: str, change: Callable[[StoredJob], StoredJob | None]
    ) -> StoredJob | None:
        """Apply ``change`` to the record by compare-and-swap; the record written, or None.

        ``change`` sees the current record and returns the new one, or None to leave it
        (then nothing is written and None is returned). A lost race reads again.
        """
        with self._written_lock:
            last = self._written.get(response_id)
        if last is not None:
            # Most transitions follow this process's own last write: no read needed. A
            # stale guess fails its conditional write; a no-op on it is checked below.
            new = change(last[0])
            if new is not None:
                with contextlib.suppress(ConflictError):
                    return self._write(new, last[1])
            self._forget_written(response_id)
        for _ in range(_CAS_ROUNDS):
            found = self.read_versioned(response_id)
            if found is None:
                return None
            new = change(found[0])
            if new is None:
                return None
            try:
                return self._write(new, found[1])
            except ConflictError:
                continue
        raise StorageError(f"job {response_id}: {_CAS_ROUNDS} writers raced for its record")

    def ids(self) -> Iterator[tuple[str, datetime]]:
        """Every job id in the store with when its record was last written."""
        for rid, modified, _open in self.listing():
            yield rid, modified

    def listing(self) -> Iterator[tuple[str, datetime, bool]]:
        """Every job id, when its record was last written, and whether its input is there.

        A job that has not finished always has its input (written before its record,
        deleted after it finished): one listing tells the jobs a sweep must read from
        the finished ones, which need no read until they may have expired.
        """
        head = f"{self.prefix}jobs/"
        with_input: set[str] = set()
        records: dict[str, datetime] = {}
        for info in self.backend.list(head):
            rid, _, name = info.key[len(head) :].partition("/")
            if name == "input.json":
                with_input.add(rid)
            elif name == "record.json":
                records[rid] = info.modified
        for rid, modified in records.items():
            yield rid, modified, rid in with_input

    def delete(self, response_id: str) -> bool:
        """Delete a job's record (only if unchanged since read), then its other files."""
        self._forget_written(response_id)
        found = self.backend.get_versioned(self._key(response_id, "record"))
        if found is None or not self.backend.delete_if(
            self._key(response_id, "record"), found.version
        ):
            return False
        self.backend.delete([self._key(response_id, "input"), self._key(response_id, "result")])
        return True

    # ---- inputs and results -----------------------------------------------------------

    def input(self, response_id: str) -> bytes | None:
        return self.backend.get_or_none(self._key(response_id, "input"))

    def finish_files(self, *response_ids: str) -> None:
        """Drop finished jobs' inputs (one request for many): only records and results stay."""
        self.backend.delete([self._key(rid, "input") for rid in response_ids])

    def put_result(self, response_id: str, body: bytes) -> None:
        """Write a job's answer; the first one written stays (two runs of one job, one answer)."""
        with contextlib.suppress(ConflictError):
            self.backend.put_if(self._key(response_id, "result"), body, _JSON, {}, None)

    def result(self, response_id: str) -> bytes | None:
        return self.backend.get_or_none(self._key(response_id, "result"))

    # ---- idempotency keys -------------------------------------------------------------

    def _idem_key(self, owner: str, key: str) -> str:
        digest = hmac.new(self._id_key, f"{owner}\0{key}".encode(), hashlib.sha256).hexdigest()
        return f"{self.prefix}idempotency/{digest}.json"

    def remember(
        self, owner: str, key: str, body_digest: str, response_id: str, ttl_s: float
    ) -> IdempotencyEntry:
        """Bind ``key`` to ``response_id``, or return what it was bound to first (within TTL)."""
        where = self._idem_key(owner, key)
        entry = IdempotencyEntry(
            response_id=response_id, body_digest=body_digest, created_at=time.time()
        )
        for _ in range(_CAS_ROUNDS):
            found = self.backend.get_versioned(where)
            expected = None
            if found is not None:
                first = IdempotencyEntry.model_validate_json(found.data)
                if time.time() < first.created_at + ttl_s:
                    return first
                expected = found.version  # an expired binding is replaced
            try:
                self.backend.put_if(where, entry.model_dump_json().encode(), _JSON, {}, expected)
            except ConflictError:
                continue
            return entry
        raise StorageError(f"idempotency key: {_CAS_ROUNDS} writers raced for it")

    def forget_key(self, owner: str, key: str) -> None:
        """Unbind a key whose first request was refused or failed: a retry starts afresh."""
        self.backend.delete([self._idem_key(owner, key)])

    def forget_expired_keys(self, ttl_s: float) -> int:
        head = f"{self.prefix}idempotency/"
        old = [
            info.key
            for info in self.backend.list(head)
            if info.modified.timestamp() + ttl_s < time.time()
        ]
        self.backend.delete(old)
        return len(old)


def open_job_store(
    *,
    state_dir: str | None,
    jobs_url: str | None,
    endpoint_url: str | None = None,
) -> JobStore:
    """The store a configuration names: S3 (``jobs_url``), a directory, or memory (neither)."""
    if jobs_url:
        if not jobs_url.startswith("s3://") or len(jobs_url) <= len("s3://"):
            raise StorageError(
                f"jobs_url: {jobs_url!r} is not an S3 URL; expected s3://bucket/prefix"
            )
        bucket, _, prefix = jobs_url[len("s3://") :].partition("/")
        from ..storage.backends import S3Backend

        s3 = S3Backend.from_config(
            bucket, endpoint_url=endpoint_url, addressing_style="path", max_pool_connections=32
        )
        s3.check()
        return JobStore(s3, prefix)
    if state_dir:
        local = LocalBackend(state_dir)
        local.check()
        return JobStore(local)
    return JobStore(MemoryBackend())


def body_digest(engine: str, is_async: bool, body: bytes) -> str:
    """What an idempotency key is bound to: the engine, sync or async, and the exact body."""
    head = json.dumps([engine, is_async]).encode()
    return hashlib.sha256(head + b"\0" + body).hexdigest()
