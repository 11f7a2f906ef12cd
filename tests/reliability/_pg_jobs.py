"""A job of the image asset for the multiprocess executor, loadable by ``reconstructable``.

The multiprocess executor runs each step in a new process that imports this file by
path, so it holds only module-level definitions with absolute imports, and every
setting comes from the environment (``EnvVar``) the test sets before launching.
"""

import os

import dagster as dg

from dagster_octoai.api.models import GeneratedImage
from dagster_octoai.assets import octoai_image_asset
from dagster_octoai.io_managers import S3ImageIOManager
from dagster_octoai.resources import OctoAIResource

reefs = octoai_image_asset(
    "pg_reefs",
    {
        "engine": "sd",
        "prompt": "a coral reef at noon",
        "steps": 1,
        "num_images": 3,
        "seed": [5, 6, 7],
    },
    io_manager_key="images",
    checks=False,
)


@dg.asset
def pg_reef_sizes(pg_reefs: list[GeneratedImage]) -> dg.MaterializeResult[None]:
    """Loads the images through the S3 IO manager in another process than the one that stored them."""
    return dg.MaterializeResult(
        metadata={
            "images": len(pg_reefs),
            "bytes": sum(len(image.data) for image in pg_reefs),
            "pid": os.getpid(),
        }
    )


def pg_image_job() -> dg.JobDefinition:
    """The two assets as one job on the multiprocess executor (each step its own process)."""
    defs = dg.Definitions(
        assets=[reefs, pg_reef_sizes],
        jobs=[
            dg.define_asset_job(
                "pg_image_job",
                executor_def=dg.multiprocess_executor.configured({"max_concurrent": 2}),
            )
        ],
        resources={
            "octoai": OctoAIResource(
                token=dg.EnvVar("OCTOAI_TOKEN"),
                base_url=dg.EnvVar("PG_TEST_OCTOAI_URL"),
                initial_backoff_s=0.01,
            ),
            "images": S3ImageIOManager(
                # The bucket's name validator reads an EnvVar's name, not its value.
                bucket=os.environ["PG_TEST_BUCKET"],
                endpoint_url=dg.EnvVar("PG_TEST_S3_ENDPOINT"),
                region_name="us-east-1",
                aws_access_key_id=dg.EnvVar("PG_TEST_S3_KEY"),
                aws_secret_access_key=dg.EnvVar("PG_TEST_S3_SECRET"),
                addressing_style="path",
            ),
        },
    )
    return defs.resolve_job_def("pg_image_job")
