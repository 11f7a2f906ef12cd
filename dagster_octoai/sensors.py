"""The async job sensor: a Dagster sensor around :class:`~dagster_octoai.storage.ticker.AsyncJobTicker`.

Each tick reads the ledger from its resource, runs one ticker pass (the polling engine,
which imports no Dagster, in :mod:`dagster_octoai.storage.ticker`), and turns the runs
it asks for into run requests with a dynamic partition per response id. The ledger is the
source of truth; the cursor only remembers where the round-robin walk stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dagster import (
    AssetKey,
    AssetsDefinition,
    AssetSelection,
    DagsterRunStatus,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from .api.client import OctoAIClient
from .async_assets import JOB_KIND_METADATA
from .storage.ledger import JobKind
from .storage.ticker import (
    RESPONSE_ID_TAG,
    RUN_KIND_TAG,
    AsyncJobTicker,
    AsyncSensorCursor,
    AsyncSensorSettings,
    PersistCheck,
    PersistChecker,
    TickReport,
)

if TYPE_CHECKING:
    # What define_asset_job returns; Dagster exports no public name for it.
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

__all__ = ["AsyncSensorSettings", "octoai_async_sensor"]

_MAX_WARNING_LINES = 20


def instance_persist_checker(
    context: SensorEvaluationContext, asset_key: AssetKey
) -> PersistChecker:
    """A :data:`PersistChecker` reading the sensor's Dagster instance."""

    def check(response_ids: Sequence[str]) -> Mapping[str, PersistCheck]:
        instance = context.instance
        materialized = instance.get_materialized_partitions(asset_key)
        runs = instance.get_runs(filters=RunsFilter(tags={RESPONSE_ID_TAG: list(response_ids)}))
        by_id: dict[str, list[DagsterRunStatus]] = {}
        for run in runs:
            if run.tags.get(RUN_KIND_TAG) == "failure":
                continue
            by_id.setdefault(run.tags.get(RESPONSE_ID_TAG, ""), []).append(run.status)
        out: dict[str, PersistCheck] = {}
        for rid in response_ids:
            statuses = by_id.get(rid, [])
            out[rid] = PersistCheck(
                materialized=rid in materialized,
                in_progress=any(s in _ACTIVE for s in statuses),
                failed_runs=sum(1 for s in statuses if s in _FAILED),
                any_run=bool(statuses),
            )
        return out

    return check


_ACTIVE = frozenset(
    {
        DagsterRunStatus.QUEUED,
        DagsterRunStatus.NOT_STARTED,
        DagsterRunStatus.STARTING,
        DagsterRunStatus.STARTED,
        DagsterRunStatus.MANAGED,
        DagsterRunStatus.CANCELING,
    }
)
_FAILED = frozenset({DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED})


ClientFactory = Callable[[SensorEvaluationContext, AsyncSensorSettings], OctoAIClient]


def octoai_async_sensor(
    *,
    asset: AssetsDefinition,
    name: str = "octoai_async_sensor",
    ledger_resource_key: str = "octoai_ledger",
    octoai_resource_key: str = "octoai",
    minimum_interval_seconds: int = 30,
    settings: AsyncSensorSettings | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
    client_factory: ClientFactory | None = None,
    job: UnresolvedAssetJobDefinition | None = None,
) -> SensorDefinition:
    """A sensor that polls the ledger's async jobs and requests a persist run for each result.

    Args:
        asset: The fetch-and-persist asset (from :func:`octoai_async_results_asset`, or
            :func:`~dagster_octoai.video_assets.octoai_async_video_results_asset` for videos),
            partitioned by a :class:`DynamicPartitionsDefinition` of response ids. The
            sensor polls the ledger's jobs of the kind that asset stores, so image and
            video jobs can share one ledger, each with its own sensor.
        name: The sensor's name.
        ledger_resource_key: Key of the :class:`JobLedgerResource`.
        octoai_resource_key: Key of the :class:`OctoAIResource` (token and base URL).
        minimum_interval_seconds: Seconds between ticks.
        settings: How the sensor polls, resubmits and warns (polls in flight, the tick's
            time budget, resubmissions, persist runs, result lifetime and warnings,
            intent grace, how often a record is rewritten for its poll time); the
            defaults of :class:`~dagster_octoai.AsyncSensorSettings` when unset.
        default_status: Whether the sensor starts running when deployed.
        client_factory: Builds the poll client; default: from the OctoAI resource.
        job: The job its runs run (an asset job selecting ``asset``), so they show under a
            name of yours; default: ``<asset>_persist_job``, made here.

    Examples:
        >>> from dagster_octoai.async_assets import octoai_async_results_asset
        >>> results = octoai_async_results_asset(name="async_images")
        >>> octoai_async_sensor(asset=results).name
        'octoai_async_sensor'
        >>> octoai_async_sensor(
        ...     asset=results, settings=AsyncSensorSettings(max_concurrent_polls=4)
        ... ).name
        'octoai_async_sensor'
    """
    settings = _checked_settings(settings)
    partitions_def = _response_id_partitions(asset)
    asset_key = asset.key
    kind = _job_kind(asset)
    make_client = client_factory or _client_from_resource(octoai_resource_key)
    # A named job: with `target=asset` the runs would show as `__anonymous_asset_job_...`.
    persist_job = job or define_asset_job(
        f"{asset_key.to_python_identifier()}_persist_job",
        selection=AssetSelection.assets(asset),
        description=(
            f"Fetches one completed OctoAI async job and stores its images as a partition of "
            f"{asset_key.to_user_string()} (run by {name})."
        ),
    )

    @sensor(
        name=name,
        job=persist_job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        required_resource_keys={ledger_resource_key, octoai_resource_key},
        description=(
            "Polls the OctoAI async jobs of the ledger and requests a persist run of "
            f"{asset_key.to_user_string()} for each completed job."
        ),
    )
    def _octoai_async_sensor(context: SensorEvaluationContext, **_: Any) -> SensorResult:
        # ``**_`` takes the resources that direct invocation (``sensor(context)``) passes as
        # keyword arguments; the daemon passes none, and both are read from the context.
        ledger = getattr(context.resources, ledger_resource_key).get_ledger()
        with make_client(context, settings) as client:
            checker = instance_persist_checker(context, asset_key)
            ticker = AsyncJobTicker(ledger, client, settings, checker, log=context.log, kind=kind)
            report = ticker.tick(AsyncSensorCursor.parse(context.cursor, context.log))
        return _sensor_result(context, report, partitions_def)

    return _octoai_async_sensor


def _job_kind(asset: AssetsDefinition) -> JobKind | None:
    """The job kind a results asset stores (its metadata says); ``None``: an asset of yours."""
    value = asset.metadata_by_key.get(asset.key, {}).get(JOB_KIND_METADATA)
    raw = getattr(value, "value", value)
    if raw in ("image", "video"):
        kind: JobKind = raw
        return kind
    return None


def _checked_settings(settings: AsyncSensorSettings | None) -> AsyncSensorSettings:
    if settings is None:
        return AsyncSensorSettings()
    if not isinstance(settings, AsyncSensorSettings):
        raise TypeError(
            f"settings: expected an AsyncSensorSettings, got {type(settings).__name__}; "
            "e.g. settings=AsyncSensorSettings(max_concurrent_polls=4)"
        )
    return settings


def _response_id_partitions(asset: AssetsDefinition) -> DynamicPartitionsDefinition:
    partitions_def = asset.partitions_def
    if not isinstance(partitions_def, DynamicPartitionsDefinition) or partitions_def.name is None:
        raise ValueError(
            f"asset: {asset.key.to_user_string()!r} must be partitioned by a named "
            "DynamicPartitionsDefinition (one partition per response id); build it with "
            "octoai_async_results_asset()"
        )
    return partitions_def


def _sensor_result(
    context: SensorEvaluationContext,
    report: TickReport,
    partitions_def: DynamicPartitionsDefinition,
) -> SensorResult:
    """The tick's warnings logged, and its run requests with a partition per response id."""
    for line in report.warnings[:_MAX_WARNING_LINES]:
        context.log.warning(line)
    if len(report.warnings) > _MAX_WARNING_LINES:
        context.log.warning(f"... and {len(report.warnings) - _MAX_WARNING_LINES} more")
    context.log.info(report.summary())
    if not report.requests:
        return SensorResult(skip_reason=report.summary(), cursor=report.cursor.to_json())
    new_partitions = sorted({r.partition_key for r in report.requests})
    return SensorResult(
        run_requests=[
            RunRequest(run_key=r.run_key, partition_key=r.partition_key, tags=r.tags)
            for r in report.requests
        ],
        dynamic_partitions_requests=[partitions_def.build_add_request(new_partitions)],
        cursor=report.cursor.to_json(),
    )


def _client_from_resource(resource_key: str) -> ClientFactory:
    def make(context: SensorEvaluationContext, settings: AsyncSensorSettings) -> OctoAIClient:
        resource = getattr(context.resources, resource_key)
        return sensor_client(resource, settings)

    return make


def sensor_client(resource: Any, settings: AsyncSensorSettings) -> OctoAIClient:
    """A client for one tick: the resource's token and URL, with timeouts that fit the budget."""
    from .api._retry import HTTPRetryPolicy

    per_call = max(min(10.0, settings.tick_time_budget_s / 4), 1.0)
    return OctoAIClient(
        resource.token,
        base_url=resource.base_url,
        timeout=per_call,
        retry=HTTPRetryPolicy(max_attempts=2, deadline_s=per_call * 2, max_retry_after_s=per_call),
        max_concurrency=settings.max_concurrent_polls,
        trusted_origins=getattr(resource, "trusted_origins", ()) or (),
    )
