"""The example project's ``Definitions``: ``dagster dev -m example_project.definitions``.

Python definitions and the YAML ones under ``defs/`` (Dagster Components, loaded with
``load_defs`` as ``dg`` loads a project's) are merged into one ``Definitions``.
Resources are configured from environment variables with local defaults (see
:class:`example_project.settings.ExampleSettings`): the OctoAI resource talks to
``OCTOAI_BASE_URL`` (the local server by default) with the token from
``EnvVar("OCTOAI_TOKEN")``; images go to S3 when ``EXAMPLE_S3_BUCKET`` or
``EXAMPLE_S3_ENDPOINT_URL`` is set, else to a local directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    Definitions,
    EnvVar,
    JobDefinition,
    RunRequest,
    ScheduleEvaluationContext,
    define_asset_job,
    load_defs,
    schedule,
)

from dagster_octoai.io_managers import LocalImageIOManager, S3ImageIOManager, with_image_uris
from dagster_octoai.resources import JobLedgerResource, OctoAIResource

from . import defs as yaml_defs
from .async_batch import (
    lifestyle_jobs,
    lifestyle_persist_job,
    lifestyle_shots,
    lifestyle_shots_sensor,
)
from .catalogue import prompt_catalogue
from .contact_sheet import contact_sheet
from .generation import GROUP as PRODUCTS_GROUP, IMAGES_IO, PRODUCT_ASSETS
from .settings import ExampleSettings

settings = ExampleSettings.from_env()

#: Every product asset of one product (partition), catalogue first.
product_images_job = define_asset_job(
    "product_images_job",
    selection=AssetSelection.groups(PRODUCTS_GROUP),
    description="Catalogue record, SDXL shot and its img2img, ControlNet and inpainting variations.",
)
contact_sheet_job = define_asset_job(
    "contact_sheet_job", selection=AssetSelection.assets(contact_sheet)
)
lifestyle_submit_job = define_asset_job(
    "lifestyle_submit_job", selection=AssetSelection.assets(lifestyle_jobs)
)


@schedule(
    job=product_images_job,
    cron_schedule="0 6 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.STOPPED,
)
def daily_product_images(context: ScheduleEvaluationContext) -> Iterator[RunRequest]:
    """Every morning, one run per product; the run key makes each day's runs unique."""
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    for product in product_images_job.partitions_def.get_partition_keys():  # type: ignore[union-attr]
        yield RunRequest(run_key=f"{day}/{product}", partition_key=product)


def _s3_credentials() -> dict[str, object]:
    # EnvVar keeps the secret out of the UI; unset, boto3's default chain is used.
    if "AWS_ACCESS_KEY_ID" not in os.environ:
        return {}
    return {
        "aws_access_key_id": EnvVar("AWS_ACCESS_KEY_ID"),
        "aws_secret_access_key": EnvVar("AWS_SECRET_ACCESS_KEY"),
    }


def build_resources(config: ExampleSettings) -> dict[str, object]:
    """The resources for ``config``: OctoAI, the image IO manager and the async job ledger."""
    octoai = OctoAIResource(
        token=EnvVar("OCTOAI_TOKEN"),
        base_url=config.octoai_base_url,
        timeout_s=60.0,
        max_concurrency=4,
    )
    images: LocalImageIOManager | S3ImageIOManager
    ledger: JobLedgerResource
    if config.s3_bucket is not None:
        images = S3ImageIOManager(
            bucket=config.s3_bucket,
            prefix=config.s3_prefix,
            endpoint_url=config.s3_endpoint_url,
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            addressing_style="path" if config.s3_endpoint_url else "auto",
            **_s3_credentials(),  # type: ignore[arg-type]
        )
        ledger = JobLedgerResource(
            bucket=config.s3_bucket,
            prefix=f"{config.s3_prefix}/_jobs",
            endpoint_url=config.s3_endpoint_url,
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            **_s3_credentials(),  # type: ignore[arg-type]
        )
    else:
        images = LocalImageIOManager(
            base_dir=str(config.output_dir / "images"), prefix=config.s3_prefix
        )
        ledger = JobLedgerResource(base_dir=str(config.output_dir / "jobs"))
    return {"octoai": octoai, IMAGES_IO: images, "octoai_ledger": ledger}


def build_definitions(config: ExampleSettings) -> Definitions:
    """The project's definitions with resources for ``config`` (tests pass their own)."""
    python = Definitions(
        assets=[
            prompt_catalogue,
            *PRODUCT_ASSETS,
            contact_sheet,
            lifestyle_jobs,
            lifestyle_shots,
        ],
        jobs=[product_images_job, contact_sheet_job, lifestyle_submit_job, lifestyle_persist_job],
        schedules=[daily_product_images],
        sensors=[lifestyle_shots_sensor],
        resources=build_resources(config),
    )
    # with_image_uris: each image asset shows where its images go (dagster/uri) before it runs.
    return with_image_uris(Definitions.merge(python, load_defs(yaml_defs, project_root=_REPO)))


_REPO = Path(__file__).resolve().parent.parent


defs = build_definitions(settings)


def resolved_product_images_job() -> JobDefinition:
    """``product_images_job`` resolved against ``defs``, for Python APIs that rebuild it per process.

    ``execute_job(reconstructable(resolved_product_images_job), instance, ...)`` runs it
    under the multiprocess executor: each step process imports this module again and
    reads the same environment variables.
    """
    return defs.resolve_job_def("product_images_job")
