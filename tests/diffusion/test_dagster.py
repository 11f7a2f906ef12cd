"""One Dagster asset end to end on the diffusers backend: request, diffusion, SeaweedFS."""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import io
import json

import pytest
from dagster import materialize
from PIL import Image

from dagster_octoai.assets import octoai_image_asset
from dagster_octoai.io_managers import S3ImageIOManager
from dagster_octoai.resources import OctoAIResource
from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["s3_bucket", "seaweedfs"]  # fixtures used by this module

pytestmark = pytest.mark.timeout(600)


def test_an_asset_materializes_through_the_diffusers_backend_into_s3(
    diffusers_server: LocalOctoAIServer, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    shots = octoai_image_asset(
        "tiny_sd_shots",
        {
            "engine": "sd",
            "prompt": "a product shot of a (red:1.2) shoe",
            "seed": 21,
            "num_images": 2,
            "steps": 2,
            "sampler": "K_EULER_ANCESTRAL",
            "loras": {"tiny-ink": 0.5},
        },
    )
    before = diffusers_server.stats()["paid_generations"]
    io_manager = S3ImageIOManager(
        bucket=s3_bucket,
        prefix="octoai",
        endpoint_url=seaweedfs.endpoint_url,
        region_name=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
        addressing_style="path",
    )
    assert diffusers_server.token is not None
    result = materialize(
        [shots],
        resources={
            "octoai": OctoAIResource(
                token=diffusers_server.token, base_url=diffusers_server.url, timeout_s=600
            ),
            "io_manager": io_manager,
        },
    )
    assert result.success
    assert diffusers_server.stats()["paid_generations"] - before == 2
    (event,) = result.asset_materializations_for_node("tiny_sd_shots")
    assert event.metadata["seeds"].value == [21, 22]

    client = seaweedfs.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    images = [k for k in keys if k.endswith(".jpg")]
    assert len(images) == 2, keys
    for key, seed in zip(images, (21, 22), strict=True):
        obj = client.get_object(Bucket=s3_bucket, Key=key)
        assert obj["Metadata"]["seed"] == str(seed)
        image = Image.open(io.BytesIO(obj["Body"].read()))
        assert (image.format, image.size) == ("JPEG", (512, 512))
    manifest = next(k for k in keys if k.endswith("manifest.json"))
    record = json.loads(client.get_object(Bucket=s3_bucket, Key=manifest)["Body"].read())
    # The manifest commits the request that made the images, LoRA included.
    assert "tiny-ink" in json.dumps(record)
