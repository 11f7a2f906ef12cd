"""An async batch: lifestyle shots submitted as OctoAI async jobs, persisted by a sensor.

``lifestyle_jobs`` submits one job per product and records each in the job ledger
before it returns. ``lifestyle_shots_sensor`` polls the open jobs on each tick and,
for each completed one, requests a run of ``lifestyle_shots`` (one dynamic partition
per response id) that fetches the images and stores them through the ``images`` IO
manager. Nothing paid for is lost if a process dies in between: the ledger remembers.
"""

from __future__ import annotations

from collections.abc import Iterable

from dagster import AssetExecutionContext, AssetSelection, DefaultSensorStatus, define_asset_job

from dagster_octoai.async_assets import octoai_async_results_asset, octoai_async_submit_asset
from dagster_octoai.sensors import octoai_async_sensor

from .catalogue import PRODUCTS
from .generation import BASE_REQUEST, IMAGES_IO

GROUP = "lifestyle"

lifestyle_shots = octoai_async_results_asset(
    "lifestyle_shots",
    io_manager_key=IMAGES_IO,
    group_name=GROUP,
    description="Images of one async lifestyle-shot job (partition = the job's response id).",
)


def lifestyle_requests(context: AssetExecutionContext) -> Iterable[dict[str, object]]:
    """One request per product; explicit seeds, so a re-submit never pays twice."""
    for index, product in enumerate(sorted(PRODUCTS)):
        yield {
            **BASE_REQUEST,
            "prompt": f"{PRODUCTS[product]}, in a cosy living room, lifestyle photography",
            "seed": 5000 + index,
        }


lifestyle_jobs = octoai_async_submit_asset(
    "lifestyle_jobs",
    lifestyle_requests,
    results_asset=lifestyle_shots,
    group_name=GROUP,
    description="Submits one async lifestyle-shot job per product and records it in the ledger.",
)

#: What the sensor's run requests run: fetch and store one job's images. Named, so the
#: sensor's runs show as `lifestyle_persist_job` in the UI.
lifestyle_persist_job = define_asset_job(
    "lifestyle_persist_job", selection=AssetSelection.assets(lifestyle_shots)
)

lifestyle_shots_sensor = octoai_async_sensor(
    asset=lifestyle_shots,
    name="lifestyle_shots_sensor",
    job=lifestyle_persist_job,
    minimum_interval_seconds=15,
    # Running by default: in `make dev` the submitted jobs are persisted without a click.
    default_status=DefaultSensorStatus.RUNNING,
)
