"""One Dagster asset per new engine (ssd, sd3, flux-schnell, flux-dev), end to end into S3."""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import io

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

REQUESTS = {
    "ssd": {"prompt": "a shoe", "steps": 2, "style_preset": "photographic"},
    "sd3": {"prompt": "a shoe", "steps": 2, "negative_prompt": "blurry"},
    "flux-schnell": {"prompt": "a shoe", "width": 512, "height": 512},  # schnell's 4 steps
    "flux-dev": {
        "prompt": "a shoe",
        "steps": 2,
        "width": 512,
        "height": 512,
        "loras": {"tiny-flux-ink": 0.5},
    },
}


def test_one_asset_per_new_engine_into_s3(
    engines_server: LocalOctoAIServer, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    assets = [
        octoai_image_asset(
            f"tiny_{engine.replace('-', '_')}", {"engine": engine, "seed": 31, **body}
        )
        for engine, body in REQUESTS.items()
    ]
    assert engines_server.token is not None
    result = materialize(
        assets,
        resources={
            "octoai": OctoAIResource(
                token=engines_server.token, base_url=engines_server.url, timeout_s=600
            ),
            "io_manager": S3ImageIOManager(
                bucket=s3_bucket,
                prefix="octoai",
                endpoint_url=seaweedfs.endpoint_url,
                region_name=seaweedfs.region,
                aws_access_key_id=seaweedfs.access_key,
                aws_secret_access_key=seaweedfs.secret_key,
                addressing_style="path",
            ),
        },
    )
    assert result.success
    client = seaweedfs.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    for engine, body in REQUESTS.items():
        name = f"tiny_{engine.replace('-', '_')}"
        (event,) = result.asset_materializations_for_node(name)
        assert event.metadata["seeds"].value == [31]
        (key,) = [k for k in keys if name in k and k.endswith(".jpg")]
        obj = client.get_object(Bucket=s3_bucket, Key=key)
        assert obj["Metadata"]["seed"] == "31"
        size = (body.get("width", 1024), body.get("height", 1024))
        assert Image.open(io.BytesIO(obj["Body"].read())).size == size
        # The manifest commits the request that made the image, its engine included.
        (manifest,) = [k for k in keys if name in k and k.endswith("manifest.json")]
        record = client.get_object(Bucket=s3_bucket, Key=manifest)["Body"].read().decode()
        assert f'"engine":"{engine}"' in record.replace(" ", "")
