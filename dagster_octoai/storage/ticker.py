"""The async sensor's polling engine (no Dagster): polls the ledger's open jobs and requests a persist run per result.

Each tick lists the ledger's open jobs (oldest first, continuing where the last
tick stopped), polls as many as its time budget allows with bounded concurrency,
and for each completed job adds a dynamic partition named by the job's response
id and requests a run of the fetch-and-persist asset with ``run_key`` = the
response id, so a job is persisted once. Expired and failed jobs are resubmitted
with the same request (same seed) up to ``max_resubmits`` times, then reported
by a failed run of the same asset carrying the job's details.

The ledger is the source of truth; the cursor only remembers where the round-robin
walk stopped and a few counters, so a lost or corrupt cursor costs one extra pass,
never a job.

Ticks may overlap (a tick the daemon timed out goes on running in the code server):
every record write is a compare-and-swap on the version the tick read, so a
resubmission, a completed transition or a persisted transition happens in one tick
only; a tick that loses the race logs it (``raced``) and leaves the job to the winner.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api.client import OctoAIClient
from ..api.errors import (
    APIStatusError,
    ConflictError,
    JobExpiredError,
    JobUnknownError,
    OctoAIError,
    RateLimitError,
    ServerError,
    TransportError,
)
from ..api.models import JobStatus
from .ledger import JobKind, JobLedger, JobRecord, JobState, submit_request

__all__ = [
    "RESPONSE_ID_TAG",
    "AsyncJobTicker",
    "AsyncSensorCursor",
    "AsyncSensorSettings",
    "TickReport",
]

logger = logging.getLogger("dagster_octoai")

#: Run tag naming the response id a persist run is for.
RESPONSE_ID_TAG = "dagster-octoai/response_id"
#: Run tag naming the ledger job id a persist run is for.
JOB_ID_TAG = "dagster-octoai/job_id"
#: Run tag saying whether a run persists a result or reports a failed job.
RUN_KIND_TAG = "dagster-octoai/kind"

CURSOR_VERSION: Literal[1] = 1


class AsyncSensorCursor(BaseModel):
    """The sensor's cursor: where the round-robin walk stopped, and running totals.

    Small by design (a few hundred bytes at any number of jobs): no job lists, no
    token. ``parse`` never raises: an unreadable or other-version cursor gives a
    fresh one and a warning, and the next tick starts again from the ledger.

    Examples:
        >>> c = AsyncSensorCursor(position="0001-abc", ticks=3)
        >>> AsyncSensorCursor.parse(c.to_json()) == c
        True
        >>> AsyncSensorCursor.parse("not json").ticks
        0
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = CURSOR_VERSION
    position: str | None = Field(
        default=None, description="Last open marker reached; next tick goes on after it."
    )
    ticks: int = 0
    polls: int = 0
    completed: int = 0
    persisted: int = 0
    resubmitted: int = 0
    failed: int = 0

    def to_json(self) -> str:
        """The cursor string stored by Dagster."""
        return self.model_dump_json()

    @classmethod
    def parse(cls, raw: str | None, log: logging.Logger | Any = logger) -> AsyncSensorCursor:
        """The cursor in ``raw``; a fresh one (with a warning) if it is missing, corrupt or old."""
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and data.get("version") != CURSOR_VERSION:
                raise ValueError(
                    f"cursor version {data.get('version')!r}, expected {CURSOR_VERSION}"
                )
            return cls.model_validate(data)
        except (ValueError, ValidationError) as exc:
            log.warning(
                "octoai async sensor: cursor unreadable (%s); starting fresh from the ledger "
                "(no job is lost: the ledger, not the cursor, lists them)",
                str(exc).splitlines()[0][:200],
            )
            return cls()


class AsyncSensorSettings(BaseModel):
    """How the sensor polls, resubmits and warns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent_polls: int = Field(
        default=16, ge=1, le=256, description="Polls in flight at once."
    )
    tick_time_budget_s: float = Field(
        default=25.0,
        gt=0,
        le=50,
        description=(
            "No new poll starts after this; Dagster times a tick out at 60 s, and the polls "
            "still in flight and the run requests need time after it."
        ),
    )
    max_resubmits: int = Field(
        default=2,
        ge=0,
        description="Resubmissions of an expired or failed job before it is reported failed.",
    )
    max_persist_runs: int = Field(
        default=3,
        ge=1,
        description="Failed persist runs of a completed job before it is reported failed.",
    )
    result_ttl_s: float = Field(
        default=24 * 3600.0, gt=0, description="How long the service keeps a result (seed: 24 h)."
    )
    warn_before_expiry_s: float = Field(
        default=6 * 3600.0,
        ge=0,
        description="Warn when a result not yet persisted is this close to expiry.",
    )
    intent_grace_s: float = Field(
        default=900.0,
        ge=0,
        description="An intent older than this, with no answer recorded, is taken as a lost submission.",
    )
    poll_record_interval_s: float = Field(
        default=300.0,
        ge=0,
        description="Rewrite a record just for its last poll time at most this often.",
    )


Kind = Literal["run", "failure"]


@dataclass(frozen=True)
class PersistRequest:
    """A run the tick asks for: persist a result, or report a failed job."""

    partition_key: str
    run_key: str
    job_id: str
    kind: Kind

    @property
    def tags(self) -> dict[str, str]:
        return {
            RESPONSE_ID_TAG: self.partition_key,
            JOB_ID_TAG: self.job_id,
            RUN_KIND_TAG: self.kind,
        }


@dataclass
class TickReport:
    """What one tick did: the runs to request, the new cursor, counts for the log."""

    requests: list[PersistRequest]
    cursor: AsyncSensorCursor
    counts: Counter[str]
    open_jobs: int
    reached: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the tick log."""
        c = self.counts
        return (
            f"octoai async jobs: {self.open_jobs} open, {self.reached} polled this tick "
            f"({self.open_jobs - self.reached} left for next ticks); "
            f"pending {c['pending']}, running {c['running']}, completed {c['completed']}, "
            f"persisted {c['persisted']}, awaiting persist {c['awaiting_persist']}, "
            f"resubmitted {c['resubmitted']}, failed {c['failed']}, unknown status {c['unknown']}, "
            f"poll errors {c['error']}, lost races {c['raced']}"
        )


@dataclass
class _Outcome:
    kind: str
    record: JobRecord | None = None
    request: PersistRequest | None = None
    warning: str | None = None
    needs_persist_check: bool = False
    polled: bool = False


@dataclass(frozen=True)
class PersistCheck:
    """What the Dagster instance knows about a completed job's persist runs."""

    materialized: bool = False
    in_progress: bool = False
    failed_runs: int = 0
    any_run: bool = False


PersistChecker = Callable[[Sequence[str]], Mapping[str, PersistCheck]]


class AsyncJobTicker:
    """One sensor tick's work, free of Dagster's sensor context (tests drive it directly).

    Args:
        ledger: The job ledger.
        client: A client for polls and resubmissions; give it short timeouts.
        settings: Polling and resubmission settings.
        check_persisted: Answers, for response ids of completed jobs, whether their
            partition is materialized and how their persist runs went.
        kind: Only the ledger's jobs of this kind (``image`` or ``video``): those whose
            results the sensor's asset stores; ``None``: every job.
    """

    def __init__(
        self,
        ledger: JobLedger,
        client: OctoAIClient,
        settings: AsyncSensorSettings,
        check_persisted: PersistChecker,
        *,
        log: logging.Logger | Any = logger,
        kind: JobKind | None = None,
    ) -> None:
        self.ledger = ledger
        self.kind = kind
        self.client = client
        self.settings = settings
        self.check_persisted = check_persisted
        self.log = log

    # ---- the tick ------------------------------------------------------------------------

    def tick(self, cursor: AsyncSensorCursor) -> TickReport:
        """Poll what the time budget allows, oldest first from the cursor's position."""
        started = time.monotonic()
        deadline = started + self.settings.tick_time_budget_s
        markers = self.ledger.list_open()
        order = _rotate(markers, cursor.position)
        outcomes: list[_Outcome] = []
        reached = 0
        position: str | None = cursor.position
        width = self.settings.max_concurrent_polls
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="octoai-poll") as pool:
            in_flight: set[Future[_Outcome]] = set()
            for marker in order:
                if time.monotonic() >= deadline:
                    break
                if len(in_flight) >= 2 * width:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    outcomes.extend(f.result() for f in done)
                    if time.monotonic() >= deadline:
                        break
                in_flight.add(pool.submit(self._visit, marker))
                reached += 1
                position = marker
            outcomes.extend(f.result() for f in in_flight)
        if reached == len(order):
            position = None  # all reached: the next tick starts again with the oldest

        counts: Counter[str] = Counter()
        requests: list[PersistRequest] = []
        warnings: list[str] = []
        to_check: dict[str, JobRecord] = {}
        for out in outcomes:
            counts[out.kind] += 1
            counts["polled"] += out.polled
            if out.request is not None:
                requests.append(out.request)
            if out.warning:
                warnings.append(out.warning)
            if out.needs_persist_check and out.record is not None and out.record.response_id:
                to_check[out.record.response_id] = out.record
        if to_check:
            for out in self._reconcile(to_check):
                counts[out.kind] += 1
                if out.request is not None:
                    requests.append(out.request)
                if out.warning:
                    warnings.append(out.warning)

        new_cursor = cursor.model_copy(
            update={
                "position": position,
                "ticks": cursor.ticks + 1,
                "polls": cursor.polls + counts["polled"],
                "completed": cursor.completed + counts["completed"],
                "persisted": cursor.persisted + counts["persisted"],
                "resubmitted": cursor.resubmitted + counts["resubmitted"],
                "failed": cursor.failed + counts["failed"],
            }
        )
        return TickReport(
            requests=requests,
            cursor=new_cursor,
            counts=counts,
            open_jobs=len(markers),
            reached=reached,
            warnings=warnings,
        )

    # ---- one job ---------------------------------------------------------------------------

    def _visit(self, marker: str) -> _Outcome:
        try:
            record = self.ledger.get(self.ledger.job_id_of_marker(marker))
            if record is None or record.state.is_final:
                self.ledger.discard_marker(marker)
                return _Outcome("stale_marker")
            if record.mode == "blocking":
                # Waited for inside a run; a retry of that run resumes it.
                return _Outcome("owned_by_run", record)
            if self.kind is not None and record.kind != self.kind:
                # Another kind's job in a shared ledger: its own sensor polls it.
                return _Outcome("other_kind", record)
            if record.open_marker != marker:
                # A marker from before a rewrite with another creation time.
                self.ledger.discard_marker(marker)
                return _Outcome("stale_marker")
            return self._advance(record)
        except Exception as exc:  # one bad record must not stop the tick
            return _Outcome("error", warning=f"job marker {marker}: {type(exc).__name__}: {exc}")

    def _advance(self, record: JobRecord) -> _Outcome:
        now = self.ledger.now()
        if record.state is JobState.INTENT:
            age = (now - record.updated_at).total_seconds()
            if record.error is None and age < self.settings.intent_grace_s:
                return _Outcome("submitting", record)
            reason = record.error or (
                f"submission never recorded an answer within {self.settings.intent_grace_s:g} s "
                "(the submitting process died, or its POST failed); its response id, if any, "
                "is unknowable"
            )
            return self._resubmit_or_fail(record, reason, JobState.FAILED)
        if record.state is JobState.COMPLETED:
            return _Outcome("awaiting_persist", record, needs_persist_check=True)
        return self._poll(record, now)

    def _poll(self, record: JobRecord, now: datetime) -> _Outcome:
        out = self._poll_once(record, now)
        out.polled = True
        return out

    def _poll_once(self, record: JobRecord, now: datetime) -> _Outcome:
        try:
            result = self.client.poll(record.job())
        except (JobExpiredError, JobUnknownError) as exc:
            return self._resubmit_or_fail(
                record, f"result expired or unknown (404) on poll: {exc.message}", JobState.EXPIRED
            )
        except (TransportError, RateLimitError, ServerError) as exc:
            return _Outcome(
                "error",
                record,
                warning=f"job {record.response_id}: poll failed, retried next tick: {exc}",
            )
        except APIStatusError as exc:
            return _Outcome(
                "error", record, warning=f"job {record.response_id}: poll refused: {exc}"
            )
        status = result.status
        changes: dict[str, Any] = {"raw_status": result.raw_status, "last_polled_at": now}
        if status is JobStatus.COMPLETED:
            try:
                self.ledger.save(
                    record.evolve(
                        state=JobState.COMPLETED,
                        response_url=result.response_url,
                        completed_at=now,
                        **changes,
                    )
                )
            except ConflictError:
                # The tick that won asks for the persist run (or a later reconcile does).
                return _raced(record, "recording its completion")
            return _Outcome(
                "completed",
                record,
                request=self._persist_request(record, record.response_id or record.job_id),
            )
        if status is JobStatus.CANCELLED:
            # Someone cancelled it on purpose: given up, never paid for again.
            return self._resubmit_or_fail(
                record, "cancelled on the server", JobState.CANCELLED, resubmit=False
            )
        if status is JobStatus.FAILED:
            ran = ""
            if record.running_since is not None:
                ran = f" after running {(now - record.running_since).total_seconds():.0f} s"
            return self._resubmit_or_fail(
                record, f"the service reported status {result.raw_status!r}{ran}", JobState.FAILED
            )
        warning = None
        if status is JobStatus.UNKNOWN:
            kind = "unknown"
            warning = (
                f"job {record.response_id}: unknown status {result.raw_status!r}; "
                "left as is and polled again next tick"
            )
        else:
            kind = status.value
            changes["state"] = JobState.RUNNING if status is JobStatus.RUNNING else JobState.PENDING
            if status is JobStatus.RUNNING and record.running_since is None:
                changes["running_since"] = now
        warning = warning or self._expiry_warning(record, now)
        if self._worth_writing(record, changes, now):
            # The tick came here through this record's open marker: no need to write it again.
            try:
                self.ledger.save(record.evolve(**changes), marker_exists=True)
            except ConflictError:
                return _raced(record, f"recording its {status.value} status")
        return _Outcome(kind, record, warning=warning)

    def _worth_writing(self, record: JobRecord, changes: Mapping[str, Any], now: datetime) -> bool:
        if changes.get("state", record.state) is not record.state:
            return True
        if changes.get("raw_status") != record.raw_status:
            return True
        last = record.last_polled_at
        return last is None or (now - last).total_seconds() >= self.settings.poll_record_interval_s

    def _expiry_warning(self, record: JobRecord, now: datetime) -> str | None:
        since = record.completed_at or record.submitted_at
        if since is None:
            return None
        left = since + timedelta(seconds=self.settings.result_ttl_s) - now
        if left.total_seconds() > self.settings.warn_before_expiry_s:
            return None
        hours = max(left.total_seconds(), 0) / 3600
        return (
            f"job {record.response_id} ({record.state.value}) is not persisted and its result "
            f"expires in about {hours:.1f} h (the service keeps results "
            f"{self.settings.result_ttl_s / 3600:g} h); check the persist runs"
        )

    def _resubmit_or_fail(
        self, record: JobRecord, reason: str, final: JobState, *, resubmit: bool = True
    ) -> _Outcome:
        if not resubmit or record.attempts > self.settings.max_resubmits:
            try:
                failed = self.ledger.save(
                    record.evolve(
                        state=final,
                        error=f"{reason}; gave up after {record.attempts} submission(s)",
                    )
                )
            except ConflictError:
                return _raced(record, "giving it up")
            return _Outcome(
                "failed",
                failed,
                request=self._failure_request(failed),
                warning=f"job {record.job_id} {final.value}: {failed.error}",
            )
        request = record.request_model()
        try:
            # The claim: of the ticks (and runs) that read this record, one writes the
            # intent and POSTs; the others lose here and pay nothing.
            intent = self.ledger.record_intent(record.evolve(error=None))
        except ConflictError:
            return _raced(record, "resubmitting it")
        try:
            job = submit_request(self.client, request, idempotency_key=intent.idempotency_key)
        except (TransportError, RateLimitError, ServerError) as exc:
            # Unclear whether the service accepted it: leave the intent, marked, for next tick.
            self._mark(intent, error=f"resubmission failed: {exc}")
            return _Outcome(
                "error", record, warning=f"job {record.job_id}: resubmission failed, retried: {exc}"
            )
        except OctoAIError as exc:
            refused = self._mark(
                intent, state=JobState.FAILED, error=f"{reason}; resubmission refused: {exc}"
            )
            if refused is None:
                return _raced(record, "recording its refused resubmission")
            return _Outcome(
                "failed", refused, request=self._failure_request(refused), warning=refused.error
            )
        self.ledger.record_submitted(intent, job)
        return _Outcome(
            "resubmitted",
            record,
            warning=(
                f"job {record.job_id}: {reason}; resubmitted as {job.response_id} "
                f"(attempt {intent.attempts} of {self.settings.max_resubmits + 1})"
            ),
        )

    def _mark(self, intent: JobRecord, **changes: Any) -> JobRecord | None:
        """Record what became of the submission ``intent`` claimed, if it is still that attempt.

        ``None`` when the record has moved on (another writer took the job over).
        """

        def apply(current: JobRecord) -> JobRecord | None:
            same = current.state is JobState.INTENT and current.attempts == intent.attempts
            return current.evolve(**changes) if same else None

        return self.ledger.update(intent, apply)

    # ---- persist runs ------------------------------------------------------------------------

    def _persist_request(self, record: JobRecord, partition: str, retry: int = 0) -> PersistRequest:
        run_key = partition if retry == 0 else f"{partition}:retry-{retry}"
        return PersistRequest(partition, run_key, record.job_id, "run")

    def _failure_request(self, record: JobRecord) -> PersistRequest:
        partition = record.response_id or record.job_id
        return PersistRequest(partition, f"{partition}:failed", record.job_id, "failure")

    def _reconcile(self, records: Mapping[str, JobRecord]) -> Iterator[_Outcome]:
        checks = self.check_persisted(list(records))
        now = self.ledger.now()
        for response_id, record in records.items():
            check = checks.get(response_id, PersistCheck())
            if check.materialized:
                try:
                    self.ledger.save(record.evolve(state=JobState.PERSISTED, persisted_at=now))
                except ConflictError:
                    yield _raced(record, "recording it persisted")
                    continue
                yield _Outcome("persisted", record)
                continue
            warning = self._expiry_warning(record, now)
            if check.in_progress:
                yield _Outcome("persist_running", record, warning=warning)
            elif not check.any_run:
                # Requested before but no run exists (the tick that asked died, or runs are
                # launched by hand in tests): ask again; Dagster drops a duplicate run_key.
                yield _Outcome(
                    "persist_requested",
                    record,
                    request=self._persist_request(record, response_id),
                    warning=warning,
                )
            elif check.failed_runs >= self.settings.max_persist_runs:
                try:
                    failed = self.ledger.save(
                        record.evolve(
                            state=JobState.FAILED,
                            persist_runs=check.failed_runs,
                            error=f"{check.failed_runs} persist run(s) failed; the result was not stored",
                        )
                    )
                except ConflictError:
                    yield _raced(record, "giving it up")
                    continue
                yield _Outcome(
                    "failed",
                    failed,
                    request=self._failure_request(failed),
                    warning=f"job {record.job_id}: {failed.error}",
                )
            else:
                yield self._retry_persist(record, check.failed_runs)

    def _retry_persist(self, record: JobRecord, failed_runs: int) -> _Outcome:
        # A persist run failed: is the result still there (then run again) or gone (resubmit)?
        try:
            result = self.client.poll(record.job())
        except (JobExpiredError, JobUnknownError) as exc:
            return self._resubmit_or_fail(
                record, f"result expired before it was persisted: {exc.message}", JobState.EXPIRED
            )
        except OctoAIError as exc:
            return _Outcome(
                "error", record, warning=f"job {record.response_id}: poll failed: {exc}"
            )
        if result.status is JobStatus.COMPLETED:
            try:
                self.ledger.save(record.evolve(persist_runs=failed_runs))
            except ConflictError:
                return _raced(record, "asking for another persist run")
            return _Outcome(
                "persist_retried",
                record,
                request=self._persist_request(record, record.response_id or "", failed_runs),
                warning=f"job {record.response_id}: persist run failed; requested again "
                f"({failed_runs + 1} of {self.settings.max_persist_runs})",
            )
        return self._resubmit_or_fail(
            record, f"persist run failed and the job is now {result.raw_status!r}", JobState.FAILED
        )


def _raced(record: JobRecord, doing: str) -> _Outcome:
    return _Outcome(
        "raced",
        record,
        warning=(
            f"job {record.job_id}: lost the race {doing}: a concurrent sensor tick or run "
            "wrote its record first; left to it (nothing was paid for)"
        ),
    )


def _rotate(markers: Sequence[str], position: str | None) -> list[str]:
    """Markers after ``position`` first, then from the start: a round-robin walk."""
    if position is None:
        return list(markers)
    cut = bisect.bisect_right(markers, position)
    return [*markers[cut:], *markers[:cut]]
