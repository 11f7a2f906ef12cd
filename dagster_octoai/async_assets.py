"""Assets for async inference: submit a batch, fetch and persist each result, or wait in-run.

Two ways to run async jobs:

- **Sensor path** (large batches): :func:`octoai_async_submit_asset` submits and
  records each job in the ledger before it returns; :func:`octoai_async_sensor`
  polls them and requests a run of :func:`octoai_async_results_asset` per
  completed job (one dynamic partition per response id) that fetches the images
  and hands them to the image IO manager.
- **Blocking path** (small batches): :func:`octoai_async_blocking_asset` submits,
  records the jobs, and waits with backoff inside the run; a retried or
  re-executed run finds its jobs in the ledger and resumes them instead of paying again.
"""

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    PartitionsDefinition,
)
from typing_extensions import Unpack

from .api.batch import ImageBatch
from .api.client import OctoAIClient
from .api.errors import (
    ConflictError,
    JobCancelledError,
    JobExpiredError,
    JobFailedError,
    JobUnknownError,
    OctoAIError,
    RateLimitError,
    RequestValidationError,
    ServerError,
    TransportError,
)
from .api.models import (
    ASYNC_BODY_LIMIT_BYTES,
    ImageGenerationRequest,
    ImageGenerationResponse,
    JobStatus,
)
from .assets import (
    DEFAULT_POOL,
    AssetOptions,
    Checks,
    asset_arguments,
    asset_with,
    requests_code_version,
)
from .checks import evaluate_image_checks, image_check_specs
from .io_managers import preflight_store
from .metadata import generation_metadata
from .resources import OctoAIResource, OctoAISession
from .storage.ledger import (
    JobKind,
    JobLedger,
    JobRecord,
    JobRequest,
    JobState,
    job_id_for,
    submit_request,
)

__all__ = [
    "octoai_async_blocking_asset",
    "octoai_async_results_asset",
    "octoai_async_submit_asset",
]

RequestLike = ImageGenerationRequest | Mapping[str, Any]
RequestSource = Sequence[RequestLike] | Callable[[AssetExecutionContext], Iterable[RequestLike]]

_MAX_LISTED_IDS = 100

#: A results asset's metadata key naming the job kind it stores (``image`` or ``video``):
#: its sensor polls only the ledger's jobs of that kind.
JOB_KIND_METADATA = "dagster-octoai/job_kind"


def _one_partition(context: AssetExecutionContext, what: str) -> None:
    """Refuse, before anything is sent, a run over a partition range (a single-run backfill).

    An async job is recorded per partition of the asset that submits it, and each
    response id is a partition of the results asset: one partition per run.
    """
    if context.has_partition_key or not context.has_partition_key_range:
        return
    keys = context.partition_keys
    if len(keys) <= 1:
        return
    raise Failure(
        description=(
            f"{what} {context.asset_key.to_user_string()!r} runs one partition per run, but "
            f"this run covers {len(keys)} partitions ({keys[0]} to {keys[-1]}); launch the "
            "backfill with one run per partition (BackfillPolicy.multi_run(1), Dagster's "
            "default). Nothing was submitted or paid for."
        )
    )


def _ledger(context: AssetExecutionContext, key: str) -> JobLedger:
    resource = getattr(context.resources, key)
    ledger: JobLedger = resource.get_ledger()
    return ledger


def _octoai(context: AssetExecutionContext, key: str) -> OctoAIResource:
    resource: OctoAIResource = getattr(context.resources, key)
    return resource


def _build_requests(
    context: AssetExecutionContext, source: RequestSource
) -> list[ImageGenerationRequest]:
    """Every request validated and size-checked before anything is sent."""
    raw = list(source(context) if callable(source) else source)
    requests: list[ImageGenerationRequest] = []
    for index, item in enumerate(raw):
        try:
            req = ImageGenerationRequest.build(item)
        except RequestValidationError as exc:
            raise RequestValidationError(f"requests[{index}]: {exc.message}", exc.errors) from None
        check_async_size(req, f"requests[{index}]")
        requests.append(req)
    return requests


def check_async_size(request: JobRequest, field: str) -> None:
    """Refuse, before anything is sent, a request over the 10 MB body limit of async jobs."""
    size = len(request.wire_bytes())
    if size > ASYNC_BODY_LIMIT_BYTES:
        mb = size / 1024 / 1024
        raise RequestValidationError(
            f"{field}: the JSON body is {mb:.1f} MB, over the 10 MB limit of async requests; "
            "use smaller or JPEG input images; nothing was submitted",
            [{"field": field, "message": f"body {mb:.1f} MB > 10 MB"}],
        )


def _job_ids(
    context: AssetExecutionContext, asset_key: str, requests: Sequence[JobRequest]
) -> list[str]:
    """Deterministic job ids: explicit-seed requests by content, random-seed ones per root run.

    A retried or re-executed run shares its root run id, so it finds the same jobs;
    a new run of random-seed requests asks for new images, as a user would expect.
    """
    partition = context.partition_key if context.has_partition_key else None
    root_run = context.run.root_run_id or context.run.run_id
    seen: Counter[str] = Counter()
    ids = []
    for req in requests:
        fp = req.fingerprint()
        scope = None if req.explicit_seeds is not None else root_run
        ids.append(job_id_for(asset_key, partition, req, seen[fp], scope))
        seen[fp] += 1
    return ids


_TRANSIENT = (TransportError, RateLimitError, ServerError)


# ---- submit -------------------------------------------------------------------------------


@dataclass
class _Submitted:
    job_id: str
    outcome: Literal["submitted", "resumed", "raced", "deferred", "refused"]
    response_id: str | None = None
    error: str | None = None


def _submit_one(
    ledger: JobLedger,
    client: OctoAIClient,
    request: JobRequest,
    job_id: str,
    *,
    asset_key: str,
    partition_key: str | None,
    run_id: str,
) -> _Submitted:
    existing = ledger.get(job_id)
    if existing is not None and existing.state in (JobState.PERSISTED,) and request.explicit_seeds:
        return _Submitted(job_id, "resumed", existing.response_id)
    if existing is not None and not existing.state.is_final:
        # Submitted by an earlier attempt of this run (or still in flight): never pay twice.
        return _Submitted(job_id, "resumed", existing.response_id)
    record = JobRecord.new(
        request, asset_key=asset_key, partition_key=partition_key, job_id=job_id, run_id=run_id
    )
    try:
        # The claim: a concurrent run that read the same (missing or final) record loses
        # this compare-and-swap and does not POST.
        intent = ledger.record_intent(record, replaces=existing)
    except ConflictError:
        now = ledger.get(job_id)
        return _Submitted(job_id, "raced", now.response_id if now is not None else None)
    try:
        job = submit_request(client, request, idempotency_key=intent.idempotency_key)
    except _TRANSIENT as exc:
        # Maybe accepted, maybe not: the intent stays, marked, and the sensor resubmits it.
        _mark_attempt(ledger, intent, error=f"submission failed: {exc}")
        return _Submitted(job_id, "deferred", error=str(exc))
    except OctoAIError as exc:
        _mark_attempt(ledger, intent, state=JobState.FAILED, error=f"submission refused: {exc}")
        return _Submitted(job_id, "refused", error=str(exc))
    ledger.record_submitted(intent, job)
    return _Submitted(job_id, "submitted", job.response_id)


def _mark_attempt(ledger: JobLedger, intent: JobRecord, **changes: Any) -> None:
    """Record what became of the submission ``intent`` claimed, unless the job moved on."""

    def apply(current: JobRecord) -> JobRecord | None:
        same = current.state is JobState.INTENT and current.attempts == intent.attempts
        return current.evolve(**changes) if same else None

    ledger.update(intent, apply)


def octoai_async_submit_asset(
    name: str,
    requests: RequestSource,
    *,
    results_asset: AssetsDefinition | str,
    partitions_def: PartitionsDefinition[Any] | None = None,
    ledger_resource_key: str = "octoai_ledger",
    octoai_resource_key: str = "octoai",
    io_manager_key: str | None = None,
    max_concurrency: int = 8,
    **options: Unpack[AssetOptions],
) -> AssetsDefinition:
    """An asset that submits a batch of async jobs and records each in the ledger.

    Every request is validated and checked against the 10 MB async body limit before
    any is sent. Each job's record (response id, poll URL, full request, target
    asset, partition, submit time) is written before the asset returns, with an
    intent record written before its POST. Jobs already in the ledger for this
    asset, partition and request (an earlier attempt of the same run, or explicit-seed
    requests already persisted) are not submitted again. The image IO manager the
    results will be stored with is checked first (``preflight``), so a missing bucket or
    refused credentials fail this asset before any job is paid for.

    Args:
        name: Asset name.
        requests: The requests, or a function of the context returning them (e.g.
            built from the partition key).
        results_asset: The fetch-and-persist asset the images will land in (its key
            is recorded with each job).
        partitions_def: Partitions of this asset (e.g. one per prompt).
        ledger_resource_key: Key of the :class:`JobLedgerResource`.
        octoai_resource_key: Key of the :class:`OctoAIResource`.
        io_manager_key: The image IO manager of ``results_asset``, checked before
            submitting. Defaults to ``results_asset``'s own when it is given as an
            ``AssetsDefinition``; with a name only and no key, nothing is checked.
        max_concurrency: Submissions in flight at once.
        **options: The ``@asset`` options (:class:`~dagster_octoai.assets.AssetOptions`);
            ``pool`` defaults to none (a submission holds no replica; the jobs run on the
            server's own queue), ``code_version`` to a hash of ``requests`` when they are
            a list, so a changed batch shows as stale.

    Examples:
        >>> submit = octoai_async_submit_asset(
        ...     "fox_jobs", [{"prompt": "a red fox", "seed": 7}], results_asset="fox_images")
        >>> submit.key.to_user_string()
        'fox_jobs'
    """
    target = (
        results_asset.key.to_user_string()
        if isinstance(results_asset, AssetsDefinition)
        else results_asset
    )
    if io_manager_key is None and isinstance(results_asset, AssetsDefinition):
        io_manager_key = results_asset.get_io_manager_key_for_asset_key(results_asset.key)
    store_keys = set() if io_manager_key is None else {io_manager_key}

    @asset_with(
        name=name,
        partitions_def=partitions_def,
        required_resource_keys={ledger_resource_key, octoai_resource_key, *store_keys},
        **asset_arguments(
            options,
            description=f"Submits OctoAI async jobs whose images are persisted by {target}.",
            code_version=requests_code_version(requests),
        ),
    )
    def _submit(context: AssetExecutionContext) -> MaterializeResult[None]:
        _one_partition(context, "the async submit asset")
        return submit_all(
            context,
            _build_requests(context, requests),
            target=target,
            ledger_resource_key=ledger_resource_key,
            octoai_resource_key=octoai_resource_key,
            io_manager_key=io_manager_key,
            max_concurrency=max_concurrency,
        )

    return _submit


def submit_all(
    context: AssetExecutionContext,
    built: Sequence[JobRequest],
    *,
    target: str,
    ledger_resource_key: str,
    octoai_resource_key: str,
    io_manager_key: str | None,
    max_concurrency: int,
) -> MaterializeResult[None]:
    """A submit asset's step (images or videos): every job recorded and submitted, or found
    in the ledger. ``built``: the requests, each validated and size-checked already.
    """
    # The results are stored under a partition named by each response id: not known
    # yet, so the key length is checked for the widest partition a key can get.
    preflight_store(context.resources, io_manager_key, target, any_partition=True)
    ledger = _ledger(context, ledger_resource_key)
    client = _octoai(context, octoai_resource_key).client
    ids = _job_ids(context, context.asset_key.to_user_string(), built)
    partition = context.partition_key if context.has_partition_key else None
    width = max(1, min(max_concurrency, len(built)))
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="octoai-submit") as pool:
        outcomes = list(
            pool.map(
                lambda pair: _submit_one(
                    ledger,
                    client,
                    pair[0],
                    pair[1],
                    asset_key=target,
                    partition_key=partition,
                    run_id=context.run.run_id,
                ),
                zip(built, ids, strict=True),
            )
        )
    counts = Counter(o.outcome for o in outcomes)
    context.log.info(
        f"octoai async submit: {len(outcomes)} job(s): {counts['submitted']} submitted, "
        f"{counts['resumed']} already in the ledger, {counts['raced']} submitted by a "
        f"concurrent run, {counts['deferred']} deferred to the sensor (transient error), "
        f"{counts['refused']} refused; {len(ledger.list_open())} open in the ledger"
    )
    for o in outcomes:
        if o.error:
            context.log.warning(f"job {o.job_id}: {o.outcome}: {o.error}")
        elif o.outcome == "raced":
            context.log.info(
                f"job {o.job_id}: a concurrent run recorded its submission first; "
                "not submitted again (nothing paid)"
            )
    refused = [o for o in outcomes if o.outcome == "refused"]
    metadata: dict[str, Any] = {
        "jobs": MetadataValue.int(len(outcomes)),
        "submitted": MetadataValue.int(counts["submitted"]),
        "resumed": MetadataValue.int(counts["resumed"]),
        "raced": MetadataValue.int(counts["raced"]),
        "deferred": MetadataValue.int(counts["deferred"]),
        "refused": MetadataValue.int(counts["refused"]),
        "job_ids": MetadataValue.json([o.job_id for o in outcomes][:_MAX_LISTED_IDS]),
        "response_ids": MetadataValue.json(
            [o.response_id for o in outcomes if o.response_id][:_MAX_LISTED_IDS]
        ),
        "results_asset": MetadataValue.text(target),
    }
    if refused:
        raise Failure(
            description=(
                f"{len(refused)} of {len(outcomes)} async job(s) were refused by the service "
                f"(the others are recorded and will be persisted): {refused[0].error}"
            ),
            metadata={**metadata, "errors": MetadataValue.json([o.error for o in refused])},
        )
    return MaterializeResult(metadata=metadata)


# ---- fetch and persist ----------------------------------------------------------------------


def octoai_async_results_asset(
    name: str,
    *,
    partitions_def: DynamicPartitionsDefinition | None = None,
    ledger_resource_key: str = "octoai_ledger",
    octoai_resource_key: str = "octoai",
    io_manager_key: str = "io_manager",
    checks: Checks = True,
    **options: Unpack[AssetOptions],
) -> AssetsDefinition:
    """The asset that fetches one completed async job and hands its images to the IO manager.

    Partitioned by a dynamic partition per response id (added by
    :func:`octoai_async_sensor`). The output is an :class:`ImageBatch` of the job's
    answer, which carries its request and ``response_id``, so the image IO manager
    records both with each image. Once the IO manager has stored the output, the
    ledger record is marked ``persisted``. A job the ledger records as failed or
    expired makes the run fail with the job's details in the failure's metadata.

    Args:
        name: Asset name.
        partitions_def: Defaults to ``DynamicPartitionsDefinition(name=f"{name}_jobs")``.
        ledger_resource_key: Key of the :class:`JobLedgerResource`.
        octoai_resource_key: Key of the :class:`OctoAIResource`.
        io_manager_key: The image IO manager (S3ImageIOManager or LocalImageIOManager).
        checks: The built-in image checks on each job's images, as for
            :func:`~dagster_octoai.octoai_image_asset` (``"blocking"``: a failure stops
            the assets downstream in the run).
        **options: The ``@asset`` options (:class:`~dagster_octoai.assets.AssetOptions`);
            ``pool`` defaults to none (fetching holds no replica).

    Examples:
        >>> results = octoai_async_results_asset("fox_images")
        >>> results.partitions_def.name
        'fox_images_jobs'
    """
    pdef = partitions_def or DynamicPartitionsDefinition(name=f"{name}_jobs")

    @asset_with(
        name=name,
        partitions_def=pdef,
        required_resource_keys={ledger_resource_key, octoai_resource_key, io_manager_key},
        io_manager_key=io_manager_key,
        check_specs=_check_specs(name, checks),
        **asset_arguments(
            options,
            description="Images of one OctoAI async job (partition = response id).",
            metadata={JOB_KIND_METADATA: "image"},
        ),
    )
    def _results(context: AssetExecutionContext) -> Iterator[Any]:
        yield from _fetch_result(
            context,
            ledger_resource_key=ledger_resource_key,
            octoai_resource_key=octoai_resource_key,
            checks=checks,
        )

    return _results


def collectable_job(
    context: AssetExecutionContext, ledger_resource_key: str, kind: JobKind
) -> tuple[JobLedger, JobRecord]:
    """A results asset's job (its partition is the response id), checked to be collectable.

    Raises ``Failure`` (with the job's details) for a job missing from the ledger, given
    up, superseded by a resubmission, or of another kind than this results asset stores.
    """
    _one_partition(context, f"the async {kind} results asset")
    partition = context.partition_key
    ledger = _ledger(context, ledger_resource_key)
    record = ledger.find_by_response_id(partition) or ledger.get(partition)
    if record is None:
        raise Failure(
            description=f"no async job with response id {partition!r} in the ledger "
            f"({ledger.uri(partition)}); was it submitted with another ledger?"
        )
    if record.state in _GIVEN_UP:
        raise Failure(
            description=f"async job {record.job_id} {record.state.value}: {record.error}",
            metadata=_failure_metadata(record),
        )
    if record.response_id != partition:
        raise Failure(
            description=f"response {partition} of job {record.job_id} was superseded by "
            f"resubmission {record.response_id}; materialize that partition instead",
            metadata=_failure_metadata(record),
        )
    if record.kind != kind:
        raise Failure(
            description=f"async job {record.job_id} makes {record.kind}s, but "
            f"{context.asset_key.to_user_string()} stores {kind}s; its sensor is the one "
            f"whose results asset stores {record.kind}s (record.asset_key: {record.asset_key})",
            metadata=_failure_metadata(record),
        )
    return ledger, record


def _fetch_result(
    context: AssetExecutionContext,
    *,
    ledger_resource_key: str,
    octoai_resource_key: str,
    checks: Checks,
) -> Iterator[Any]:
    """The image results asset's step: one job's images out, then its record marked persisted."""
    ledger, record = collectable_job(context, ledger_resource_key, "image")
    # get_client checks the image IO manager's store before the result is fetched.
    with _octoai(context, octoai_resource_key).get_client(context) as session:
        result = session.fetch(record.async_job())
    metadata = {
        **generation_metadata(result),
        **job_metadata(record),
        "ledger_open_jobs": MetadataValue.int(len(ledger.list_open())),
    }
    yield Output(ImageBatch([result]), metadata=metadata)
    # Dagster resumes this generator only after the IO manager stored the output.
    record_persisted(ledger, record, context.log)
    if checks:
        yield from evaluate_image_checks(context.asset_key, [result])


def record_persisted(ledger: JobLedger, record: JobRecord, log: Any) -> None:
    """Mark the job persisted by compare-and-swap: once, whichever run or tick gets there first."""
    response_id = record.response_id

    def apply(current: JobRecord) -> JobRecord | None:
        if current.response_id != response_id or current.state is JobState.PERSISTED:
            return None  # persisted by a concurrent run, or superseded by a resubmission
        return current.evolve(state=JobState.PERSISTED, persisted_at=ledger.now())

    if ledger.update(record, apply) is None:
        current = ledger.get(record.job_id)
        state = current.state.value if current is not None else "gone"
        log.info(
            f"job {record.job_id}: the ledger already records response {response_id} as "
            f"{state} (a concurrent run or tick got there first); left as it is"
        )


def job_metadata(record: JobRecord) -> dict[str, MetadataValue]:
    return {
        "response_id": MetadataValue.text(record.response_id or ""),
        "job_id": MetadataValue.text(record.job_id),
        "attempts": MetadataValue.int(record.attempts),
        "previous_response_ids": MetadataValue.json(list(record.previous_response_ids)),
        "submitted_at": MetadataValue.text(
            record.submitted_at.isoformat() if record.submitted_at else ""
        ),
    }


def _failure_metadata(record: JobRecord) -> dict[str, MetadataValue]:
    return {
        **job_metadata(record),
        "state": MetadataValue.text(record.state.value),
        "error": MetadataValue.text(record.error or ""),
        "job": MetadataValue.json(record.details()),
    }


# ---- blocking: submit and wait in the run -------------------------------------------------------


def _wait_one(
    ledger: JobLedger,
    session: OctoAISession,
    request: ImageGenerationRequest,
    job_id: str,
    *,
    asset_key: str,
    partition_key: str | None,
    run_id: str,
    wait_timeout_s: float,
    max_resubmits: int,
    log: Any,
    lock: threading.Lock,
    run_is_active: Callable[[str], bool],
    stop: threading.Event,
) -> tuple[JobRecord, ImageGenerationResponse, bool]:
    record = ledger.get(job_id)
    deadline = time.monotonic() + wait_timeout_s
    if record is not None and _submitting_elsewhere(record, run_id, run_is_active):
        with lock:
            log.info(f"job {job_id}: run {record.run_id} is submitting it; waiting for its answer")
        record = _await_submission(ledger, job_id, deadline)
    if record is None or record.state in _GIVEN_UP:
        # A new run of the asset asks for the images again: a given-up job is paid again.
        fresh = JobRecord.new(
            request,
            asset_key=asset_key,
            partition_key=partition_key,
            job_id=job_id,
            mode="blocking",
            run_id=run_id,
        )
        record = _claim_and_submit(ledger, session, request, fresh, record, deadline, log, lock)
        resumed = record.run_id != run_id
    elif record.response_id is None:
        # An intent left by a run that is no longer running: its answer is lost.
        record = _claim_and_submit(
            ledger, session, request, record.evolve(run_id=run_id), None, deadline, log, lock
        )
        resumed = record.run_id != run_id
    else:
        resumed = True
        with lock:
            log.info(f"job {job_id}: resuming response {record.response_id} from the ledger")
    while True:
        if stop.is_set():
            # The run was terminated while this job was being submitted.
            _cancel_for_termination(ledger, session, record, log, lock)
            raise JobCancelledError(f"job {job_id}: its run was terminated")
        try:
            response = session.wait(
                record.async_job(), timeout=max(deadline - time.monotonic(), 1.0)
            )
        except JobCancelledError:
            if stop.is_set():
                raise  # this run cancelled it (terminated): recorded as cancelled
            _give_up(ledger, record, "cancelled on the server", JobState.CANCELLED)
            raise
        except (JobExpiredError, JobUnknownError, JobFailedError) as exc:
            if record.attempts > max_resubmits:
                _give_up(
                    ledger, record, f"{exc.message}; gave up after {record.attempts} submission(s)"
                )
                raise
            with lock:
                log.warning(f"job {job_id}: {exc.message}; resubmitting the same request")
            record = _claim_and_submit(
                ledger, session, request, record.evolve(run_id=run_id), None, deadline, log, lock
            )
            continue
        completed = _record_completed(ledger, record)
        return completed, response, resumed


def _submitting_elsewhere(
    record: JobRecord, run_id: str, run_is_active: Callable[[str], bool]
) -> bool:
    """An intent without an answer yet whose writer may still be submitting it.

    A writer on this host is known alive or dead by its pid (a SIGKILLed run's status
    stays "started" until run monitoring notices); one elsewhere by its run's status.
    """
    if record.state is not JobState.INTENT or record.response_id is not None:
        return False
    if record.error is not None:
        return False  # its writer saw the submission fail and gave it up
    alive = record.claimant_alive()
    if alive is not None:
        return alive
    return record.run_id is not None and record.run_id != run_id and run_is_active(record.run_id)


def _await_submission(ledger: JobLedger, job_id: str, deadline: float) -> JobRecord | None:
    """Poll the ledger until another run's claimed submission is answered (or given up)."""
    pause = 0.1
    while True:
        record = ledger.get(job_id)
        if record is None or record.state is not JobState.INTENT:
            return record
        if time.monotonic() >= deadline:
            raise Failure(
                description=f"async job {job_id}: another run claimed its submission and "
                "recorded no answer within the wait timeout; run this asset again"
            )
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def _claim_and_submit(
    ledger: JobLedger,
    session: OctoAISession,
    request: ImageGenerationRequest,
    record: JobRecord,
    replaces: JobRecord | None,
    deadline: float,
    log: Any,
    lock: threading.Lock,
) -> JobRecord:
    """Claim the next submission by compare-and-swap and POST it; a lost claim waits instead.

    The run that loses the claim pays nothing: it waits for the winner's response id
    and then for the same job.
    """
    try:
        intent = ledger.record_intent(record, replaces=replaces)
    except ConflictError:
        with lock:
            log.info(
                f"job {record.job_id}: a concurrent run claimed its submission first; "
                "waiting for that job instead of paying again"
            )
        won = _await_submission(ledger, record.job_id, deadline)
        if won is None or won.response_id is None or won.state in _GIVEN_UP:
            error = won.error if won is not None else "its record is gone"
            raise Failure(
                description=f"async job {record.job_id}: the concurrent run that claimed its "
                f"submission got no usable answer ({error}); run this asset again"
            ) from None
        return won
    try:
        job = session.submit(request, idempotency_key=intent.idempotency_key)
    except BaseException as exc:
        # Say so, so that no run waits for an answer this one will never record.
        _mark_attempt(ledger, intent, error=f"submission failed: {exc}")
        raise
    return ledger.record_submitted(intent, job)


_GIVEN_UP = (JobState.FAILED, JobState.EXPIRED, JobState.CANCELLED)


def _give_up(
    ledger: JobLedger, record: JobRecord, error: str, state: JobState = JobState.FAILED
) -> None:
    def apply(current: JobRecord) -> JobRecord | None:
        if current.response_id != record.response_id or current.state.is_final:
            return None
        return current.evolve(state=state, error=error)

    ledger.update(record, apply)


_TERMINATED = "its run was terminated while waiting; the job was cancelled on the server"


def _cancel_for_termination(
    ledger: JobLedger, session: OctoAISession, record: JobRecord, log: Any, lock: threading.Lock
) -> None:
    """Cancel a job this run submitted and still waits on, and record it cancelled."""
    if record.response_id is None or record.state.is_final:
        return
    try:
        status = session.cancel(record.async_job()).status
    except Exception as exc:  # the server is gone or forgot it: the ledger still says why
        with lock:
            log.warning(f"job {record.job_id}: cancelling it failed ({exc})")
        status = None
    if status is JobStatus.COMPLETED:
        return  # it finished first: its result stays collectable
    _give_up(ledger, record, _TERMINATED, JobState.CANCELLED)
    with lock:
        log.info(f"job {record.job_id}: cancelled response {record.response_id}")


def _record_completed(ledger: JobLedger, record: JobRecord) -> JobRecord:
    def apply(current: JobRecord) -> JobRecord | None:
        if current.response_id != record.response_id or current.state.is_final:
            return None
        if current.state is JobState.COMPLETED:
            return None
        return current.evolve(state=JobState.COMPLETED, completed_at=ledger.now())

    saved = ledger.update(record, apply)
    return saved if saved is not None else (ledger.get(record.job_id) or record)


def octoai_async_blocking_asset(
    name: str,
    requests: RequestSource,
    *,
    partitions_def: PartitionsDefinition[Any] | None = None,
    ledger_resource_key: str = "octoai_ledger",
    octoai_resource_key: str = "octoai",
    io_manager_key: str = "io_manager",
    wait_timeout_s: float = 600.0,
    max_resubmits: int = 2,
    max_concurrency: int = 4,
    checks: Checks = True,
    **options: Unpack[AssetOptions],
) -> AssetsDefinition:
    """An asset that submits async jobs and waits for them inside the run (small batches).

    Job ids go to the ledger before waiting, keyed by asset, partition and request
    (and, for random seeds, the root run id), so a retried or re-executed run resumes
    the same jobs instead of paying again. Expired or failed jobs are resubmitted with
    the same request up to ``max_resubmits`` times. The output is an :class:`ImageBatch`
    of the jobs' answers, each carrying its request and ``response_id``, for the image IO
    manager, whose store is checked (``preflight``) before anything is submitted. The
    built-in image checks (``checks``, as for :func:`~dagster_octoai.octoai_image_asset`)
    run on every materialization; the step runs in the pool ``octoai`` (it holds the
    jobs' replicas while it waits), and takes the ``@asset`` options
    (:class:`~dagster_octoai.assets.AssetOptions`), ``code_version`` defaulting to a hash
    of ``requests`` when they are a list.

    Examples:
        >>> fox = octoai_async_blocking_asset("fox", [{"prompt": "a red fox", "seed": 7}])
        >>> fox.key.to_user_string()
        'fox'
    """

    @asset_with(
        name=name,
        partitions_def=partitions_def,
        required_resource_keys={ledger_resource_key, octoai_resource_key, io_manager_key},
        io_manager_key=io_manager_key,
        check_specs=_check_specs(name, checks),
        **asset_arguments(
            options,
            description="Images from OctoAI async jobs, waited for in the run.",
            code_version=requests_code_version(requests),
            pool=DEFAULT_POOL,
        ),
    )
    def _blocking(context: AssetExecutionContext) -> Iterator[Any]:
        yield from _wait_all(
            context,
            requests,
            ledger_resource_key=ledger_resource_key,
            octoai_resource_key=octoai_resource_key,
            wait_timeout_s=wait_timeout_s,
            max_resubmits=max_resubmits,
            max_concurrency=max_concurrency,
            checks=checks,
        )

    return _blocking


def _wait_all(
    context: AssetExecutionContext,
    requests: RequestSource,
    *,
    ledger_resource_key: str,
    octoai_resource_key: str,
    wait_timeout_s: float,
    max_resubmits: int,
    max_concurrency: int,
    checks: Checks,
) -> Iterator[Any]:
    """The blocking asset's step: every job submitted or resumed, waited for, then stored."""
    _one_partition(context, "the blocking async asset")
    built = _build_requests(context, requests)
    ledger = _ledger(context, ledger_resource_key)
    key = context.asset_key.to_user_string()
    ids = _job_ids(context, key, built)
    partition = context.partition_key if context.has_partition_key else None
    lock = threading.Lock()
    width = max(1, min(max_concurrency, len(built)))
    # get_client checks the image IO manager's store before anything is submitted.
    with (
        _octoai(context, octoai_resource_key).get_client(context) as session,
        ThreadPoolExecutor(max_workers=width, thread_name_prefix="octoai-wait") as pool,
    ):
        stop = threading.Event()
        waits = [
            pool.submit(
                lambda pair: _wait_one(
                    ledger,
                    session,
                    pair[0],
                    pair[1],
                    asset_key=key,
                    partition_key=partition,
                    run_id=context.run.run_id,
                    wait_timeout_s=wait_timeout_s,
                    max_resubmits=max_resubmits,
                    log=context.log,
                    lock=lock,
                    run_is_active=_run_is_active(context),
                    stop=stop,
                ),
                pair,
            )
            for pair in zip(built, ids, strict=True)
        ]
        try:
            done = [w.result() for w in waits]
        except BaseException as exc:
            if not isinstance(exc, Exception):
                # The run is being terminated (Dagster interrupts the step): cancel the
                # jobs still waited on, so that the server stops paying and the waits end.
                stop.set()
                _cancel_waiting(ledger, session, ids, context.run.run_id, context.log, lock)
            raise
    results = [resp for _, resp, _ in done]
    resumed = sum(1 for _, _, r in done if r)
    resubmitted = sum(max(rec.attempts - 1, 0) for rec, _, _ in done)
    context.log.info(
        f"octoai async (blocking): {len(done)} job(s) completed, {resumed} resumed from "
        f"the ledger, {resubmitted} resubmission(s)"
    )
    yield Output(
        ImageBatch(results),
        metadata={
            **generation_metadata(results),
            "jobs": MetadataValue.int(len(done)),
            "completed": MetadataValue.int(len(done)),
            "resumed": MetadataValue.int(resumed),
            "resubmitted": MetadataValue.int(resubmitted),
            "job_ids": MetadataValue.json(ids[:_MAX_LISTED_IDS]),
        },
    )
    for rec, _, _ in done:
        record_persisted(ledger, rec, context.log)
    if checks:
        yield from evaluate_image_checks(context.asset_key, results)


def _cancel_waiting(
    ledger: JobLedger,
    session: OctoAISession,
    ids: list[str],
    run_id: str,
    log: Any,
    lock: threading.Lock,
) -> None:
    for job_id in ids:
        record = ledger.get(job_id)
        if record is not None and record.run_id == run_id:
            _cancel_for_termination(ledger, session, record, log, lock)


def _check_specs(name: str, checks: Checks) -> list[AssetCheckSpec] | None:
    return image_check_specs(name, blocking=checks == "blocking") if checks else None


def _run_is_active(context: AssetExecutionContext) -> Callable[[str], bool]:
    """Whether a run of this instance is still going (an intent it wrote may yet be answered)."""

    def active(run_id: str) -> bool:
        run = context.instance.get_run_by_id(run_id)
        return run is not None and not run.is_finished

    return active
