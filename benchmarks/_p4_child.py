"""The run of P4, in its own process: ``python -m benchmarks._p4_child`` (config in ``P4_CONFIG``).

No ``from __future__ import annotations`` here: Dagster reads the asset's annotations.
"""

import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from dagster import AssetExecutionContext, AssetsDefinition, DagsterInstance, asset, materialize

from dagster_octoai.api.batch import ImageBatch
from dagster_octoai.api.models import ImageGenerationRequest, ImageGenerationResponse
from dagster_octoai.io_managers import S3ImageIOManager
from dagster_octoai.resources import OctoAIResource

from ._common import TOKEN, peak_rss_mb

ASSET = "p4_images"


def lazy_images_asset(count: int) -> AssetsDefinition:
    """An asset whose output is a lazy ImageBatch: each answer is stored as it arrives."""

    @asset(name=ASSET, io_manager_key="images")
    def p4_images(context: AssetExecutionContext, octoai: OctoAIResource) -> ImageBatch:
        def source() -> Iterator[ImageGenerationRequest]:
            for i in range(count):
                yield ImageGenerationRequest(prompt=f"p4 image {i}", engine="sdxl", seed=7)

        def results() -> Iterator[ImageGenerationResponse]:
            # The run's pooled client: the batch is consumed by the IO manager after
            # this function returns, while the resource is still set up. Each answer
            # carries its request.
            for _index, response in octoai.client.iter_generate(source()):
                yield response

        return ImageBatch(results(), expected_images=count)

    return p4_images


def main(config: dict[str, Any]) -> dict[str, Any]:
    """Materialize the asset once; report success, images stored and the peak RSS."""
    count = int(config["count"])
    before_run = peak_rss_mb()
    with tempfile.TemporaryDirectory() as home:
        instance = DagsterInstance.local_temp(home)
        result = materialize(
            [lazy_images_asset(count)],
            instance=instance,
            resources={
                "octoai": OctoAIResource(
                    token=TOKEN, base_url=config["server_url"], max_concurrency=4
                ),
                "images": S3ImageIOManager(
                    bucket=config["bucket"],
                    prefix="bench",
                    endpoint_url=config["endpoint_url"],
                    region_name=config["region"],
                    aws_access_key_id=config["access_key"],
                    aws_secret_access_key=config["secret_key"],
                    addressing_style="path",
                ),
            },
        )
        metadata = result.asset_materializations_for_node(ASSET)[0].metadata
        image_count = metadata["image_count"].value
    return {
        "success": result.success,
        "image_count": image_count,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_run_mb": before_run,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(os.environ["P4_CONFIG"]))))
