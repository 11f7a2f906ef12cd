"""The async sensor path run as the Dagster daemon runs it, shared by the parent and its children.

:class:`SensorSetup` builds the submit asset, the results asset, the sensor and their
resources (local server, job ledger in a directory, ``S3ImageIOManager`` on SeaweedFS)
from a plain dict of settings, so a forked child builds the same definitions.

:class:`DaemonTicks` does one sensor tick the way ``dagster-daemon`` does: evaluate
the sensor from the last saved cursor, add the dynamic partitions it asks for, save
the new cursor, then launch each requested run unless a run with its ``run_key``
exists already (the daemon's idempotence check, by the ``dagster/run_key`` tag).
Runs execute in-process with ``materialize``. Each step is its own method so a
child process can be killed between any two of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.async_assets import octoai_async_results_asset, octoai_async_submit_asset
from dagster_octoai.io_managers import S3ImageIOManager
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.sensors import AsyncSensorSettings, octoai_async_sensor
from dagster_octoai.storage import S3Backend
from dagster_octoai.storage.ledger import JobLedger, JobState

from ._children import NOT_REACHED, kill_at, redirect_output
from ._support import LEAK_TOKEN, s3_connection

if TYPE_CHECKING:
    from dagster_octoai.testing.seaweedfs import SeaweedFS

JOBS, IMAGES_PER_JOB = 4, 2
TOTAL = JOBS * IMAGES_PER_JOB


def sensor_requests(tag: str) -> list[dict[str, Any]]:
    """``JOBS`` explicit-seed requests of ``IMAGES_PER_JOB`` images (seeds 0..TOTAL-1)."""
    return [
        {
            "engine": "sd",
            "prompt": f"a kelp forest, {tag} {i}",
            "steps": 1,
            "num_images": IMAGES_PER_JOB,
            "seed": list(range(i * IMAGES_PER_JOB, (i + 1) * IMAGES_PER_JOB)),
        }
        for i in range(JOBS)
    ]


def sensor_settings(
    octoai_url: str, s3: SeaweedFS, bucket: str, ledger_dir: Path, tag: str
) -> dict[str, str]:
    """The settings of a :class:`SensorSetup` (token :data:`LEAK_TOKEN`)."""
    return {
        "token": LEAK_TOKEN,
        "octoai_url": octoai_url,
        "ledger_dir": str(ledger_dir),
        "bucket": bucket,
        "s3_endpoint": s3.endpoint_url,
        "s3_key": s3.access_key,
        "s3_secret": s3.secret_key,
        "tag": tag,
    }


class SensorSetup:
    """Definitions and resources of the sensor path, from plain settings.

    ``settings`` keys: ``token``, ``octoai_url``, ``ledger_dir``, ``bucket``,
    ``s3_endpoint``, ``s3_key``, ``s3_secret``, ``tag`` (names the requests).
    """

    def __init__(self, settings: dict[str, str]) -> None:
        self.settings = settings
        self.octoai = OctoAIResource(
            token=settings["token"], base_url=settings["octoai_url"], initial_backoff_s=0.01
        )
        self.ledger_resource = JobLedgerResource(base_dir=settings["ledger_dir"], fsync=False)
        self.images = S3ImageIOManager(
            bucket=settings["bucket"],
            **s3_connection(settings["s3_endpoint"], settings["s3_key"], settings["s3_secret"]),
            max_concurrency=2,
        )
        self.results = octoai_async_results_asset("kelp_images", io_manager_key="images")
        self.submit = octoai_async_submit_asset(
            "kelp_jobs", sensor_requests(settings["tag"]), results_asset=self.results
        )
        self.sensor = octoai_async_sensor(
            asset=self.results,
            minimum_interval_seconds=1,
            settings=AsyncSensorSettings(max_concurrent_polls=2),
        )
        self.resources: dict[str, Any] = {
            "octoai": self.octoai,
            "octoai_ledger": self.ledger_resource,
            "images": self.images,
        }
        self.defs = dg.Definitions(
            assets=[self.submit, self.results], sensors=[self.sensor], resources=self.resources
        )

    @property
    def ledger(self) -> JobLedger:
        return self.ledger_resource.get_ledger()

    def submit_jobs(self, instance: dg.DagsterInstance) -> None:
        result = dg.materialize([self.submit], instance=instance, resources=self.resources)
        assert result.success


@dataclass
class TickLog:
    """What the emulated daemon did over its ticks."""

    ticks: int = 0
    launched: list[str] = field(default_factory=list)  # run keys, in launch order
    skipped_run_keys: list[str] = field(default_factory=list)
    failed_runs: int = 0


class DaemonTicks:
    """Sensor ticks as ``dagster-daemon`` runs them, with the cursor in a file.

    Args:
        setup: The sensor path's definitions.
        instance: The Dagster instance (sqlite on disk or Postgres).
        cursor_file: Where the cursor lives between ticks (the daemon keeps it in
            the instance's instigator state).
    """

    def __init__(self, setup: SensorSetup, instance: dg.DagsterInstance, cursor_file: Path) -> None:
        self.setup = setup
        self.instance = instance
        self.cursor_file = cursor_file
        self.log = TickLog()

    def read_cursor(self) -> str | None:
        return self.cursor_file.read_text() if self.cursor_file.exists() else None

    def tick(self, cursor: str | None = None, *, use_saved: bool = True) -> list[dg.RunRequest]:
        """One tick: evaluate, add partitions, save the cursor, launch the new runs."""
        data = self._evaluate(self.read_cursor() if use_saved else cursor)
        for req in data.dynamic_partitions_requests or []:
            assert isinstance(req, dg.AddDynamicPartitionsRequest)
            self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        self._save_cursor(data.cursor)
        self.log.ticks += 1
        requests = list(data.run_requests or [])
        for request in requests:
            self._launch(request)
        return requests

    def tick_until_final(self, max_ticks: int = 8) -> None:
        """Tick until every ledger record is final (persisted, failed or expired)."""
        for _ in range(max_ticks):
            self.tick()
            records = list(self.setup.ledger.iter_records())
            if records and all(r.state.is_final for r in records):
                return
        raise AssertionError(f"jobs still open after {max_ticks} ticks: {self.log}")

    def _evaluate(self, cursor: str | None) -> Any:
        with dg.build_sensor_context(
            instance=self.instance,
            instance_ref=self.instance.get_ref(),
            cursor=cursor,
            definitions=self.setup.defs,
            resources={
                "octoai": self.setup.octoai,
                "octoai_ledger": self.setup.ledger_resource,
            },
        ) as context:
            return self.setup.sensor.evaluate_tick(context)

    def _save_cursor(self, cursor: str | None) -> None:
        if cursor is None:
            return
        tmp = self.cursor_file.with_suffix(".tmp")
        tmp.write_text(cursor)
        os.replace(tmp, self.cursor_file)

    def _launch(self, request: dg.RunRequest) -> None:
        assert request.run_key is not None
        if self.instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: request.run_key})):
            self.log.skipped_run_keys.append(request.run_key)
            return
        self.log.launched.append(request.run_key)
        result = dg.materialize(
            [self.setup.results],
            instance=self.instance,
            resources=self.setup.resources,
            partition_key=request.partition_key,
            tags={**request.tags, RUN_KEY_TAG: request.run_key},
            raise_on_error=False,
        )
        self.log.failed_runs += not result.success


def fail_dead_runs(instance: dg.DagsterInstance) -> int:
    """Mark runs left unfinished by a killed process as failed, as Dagster's run monitoring does."""
    unfinished = instance.get_runs(
        filters=dg.RunsFilter(
            statuses=[
                dg.DagsterRunStatus.STARTED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.NOT_STARTED,
            ]
        )
    )
    for run in unfinished:
        instance.report_run_failed(run, "run worker killed (found by run monitoring)")
    return len(unfinished)


def materializations_by_partition(instance: dg.DagsterInstance, asset: str) -> dict[str, int]:
    """How many times each partition of ``asset`` was materialized."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=1000).records
    counts: dict[str, int] = {}
    for record in records:
        key = record.partition_key or ""
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---- the child that evaluates ticks and is killed ----------------------------------------


def _is_state(state: JobState) -> Callable[..., bool]:
    return lambda self, record, *a, **k: record.state is state


def _is_image(self: Any, key: str, *a: Any, **k: Any) -> bool:
    return not key.endswith("manifest.json")


#: Where the sensor's process dies, and how: (owner, method, options for kill_at).
SENSOR_KILL_POINTS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    # Three of four polls answered inside the tick; no run requested, no cursor saved.
    "mid_poll": (OctoAIClient, "poll", {"nth": 3}),
    # A job recorded completed in the ledger, its run request never returned.
    "after_completed_recorded": (
        JobLedger,
        "save",
        {"nth": 2, "when": _is_state(JobState.COMPLETED)},
    ),
    # The tick returned its run requests and cursor; neither was saved.
    "before_cursor_saved": (DaemonTicks, "_save_cursor", {"before": True}),
    # Partitions added and the cursor saved; no run launched.
    "before_runs_launched": (DaemonTicks, "_launch", {"before": True}),
    # In the persist run: three images in S3, no manifest, no materialization.
    "mid_persist_upload": (S3Backend, "put", {"nth": 3, "when": _is_image}),
    # In the persist run: the IO manager stored the output, the ledger not yet told.
    "before_ledger_persisted": (
        JobLedger,
        "save",
        {"before": True, "when": _is_state(JobState.PERSISTED)},
    ),
}


def sensor_child(
    settings: dict[str, str], home: str, cursor_file: str, point: str, log_path: str
) -> None:
    """Tick the sensor (and launch its runs) until the process dies at ``point``."""
    redirect_output(log_path)
    os.environ["DAGSTER_HOME"] = home
    owner, name, options = SENSOR_KILL_POINTS[point]
    kill_at(owner, name, **options)
    setup = SensorSetup(settings)
    with dg.DagsterInstance.from_config(home) as instance:
        DaemonTicks(setup, instance, Path(cursor_file)).tick_until_final()
    sys.exit(NOT_REACHED)
