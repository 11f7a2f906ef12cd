"""P6: what Dagster and the package add around the same calls: 100 images, asset vs loop.

The asset side is what a user of the package writes: 100 assets from
``octoai_image_asset`` (SDXL, 1024x1024, one image each, explicit seeds, the built-in
asset checks on), stored by ``S3ImageIOManager`` on SeaweedFS, materialized in one
run with the in-process executor on a sqlite ``DagsterInstance``. The loop does the
same calls by hand: ``OctoAIClient.generate`` then boto3 ``put_object`` of the image
bytes, one after the other. Each repetition writes under a fresh prefix, so the asset
side pays for every generation (nothing is reused) just as the loop does. One untimed
warm-up run of each comes first (Dagster's storage modules are imported on first use).
"""

from __future__ import annotations

import secrets
import tempfile
import time
from typing import Any

from dagster import AssetsDefinition, DagsterInstance, materialize

from dagster_octoai.assets import octoai_image_asset
from dagster_octoai.client import OctoAIClient
from dagster_octoai.io_managers import S3ImageIOManager
from dagster_octoai.resources import OctoAIResource
from dagster_octoai.testing.seaweedfs import SeaweedFS

from ._common import TOKEN, Row, Settings, octoai_server, seaweedfs


def _request(i: int) -> dict[str, Any]:
    return {"prompt": f"a teapot, style {i}", "engine": "sdxl", "seed": 1000 + i}


def _assets(count: int) -> list[AssetsDefinition]:
    return [
        octoai_image_asset(f"teapot_{i:03d}", _request(i), io_manager_key="images")
        for i in range(count)
    ]


def _asset_run(
    assets: list[AssetsDefinition], url: str, s3: SeaweedFS, bucket: str, prefix: str
) -> float:
    with tempfile.TemporaryDirectory() as home:
        instance = DagsterInstance.local_temp(home)
        resources = {
            "octoai": OctoAIResource(token=TOKEN, base_url=url),
            "images": S3ImageIOManager(
                bucket=bucket,
                prefix=prefix,
                endpoint_url=s3.endpoint_url,
                region_name=s3.region,
                aws_access_key_id=s3.access_key,
                aws_secret_access_key=s3.secret_key,
                addressing_style="path",
            ),
        }
        started = time.perf_counter()
        result = materialize(assets, instance=instance, resources=resources)
        elapsed = time.perf_counter() - started
    assert result.success
    return elapsed


def _loop(count: int, url: str, s3: SeaweedFS, bucket: str, prefix: str) -> float:
    started = time.perf_counter()
    client = OctoAIClient(TOKEN, base_url=url)
    s3_client = s3.client()
    for i in range(count):
        response = client.generate(_request(i))
        image = response.images[0]
        s3_client.put_object(
            Bucket=bucket,
            Key=f"{prefix}/teapot_{i:03d}/000-seed{image.seed}.jpg",
            Body=image.data,
            ContentType="image/jpeg",
        )
    client.close()
    return time.perf_counter() - started


def run(settings: Settings) -> list[Row]:
    count = settings.n(100, 3)
    assets = _assets(count)
    asset_s: list[float] = []
    loop_s: list[float] = []
    with octoai_server(replicas=4) as server, seaweedfs() as s3:
        bucket = "bench-" + secrets.token_hex(4)
        s3.client().create_bucket(Bucket=bucket)
        # Untimed: the first run in a process imports half of Dagster's storage layer.
        _asset_run(assets[:1], server.url, s3, bucket, "p6-warmup")
        _loop(1, server.url, s3, bucket, "p6-warmup-loop")
        for rep in range(settings.reps):
            prefix = f"p6-{rep}-{secrets.token_hex(3)}"
            if rep % 2 == 0:
                asset_s.append(_asset_run(assets, server.url, s3, bucket, prefix))
                loop_s.append(_loop(count, server.url, s3, bucket, prefix + "-loop"))
            else:
                loop_s.append(_loop(count, server.url, s3, bucket, prefix + "-loop"))
                asset_s.append(_asset_run(assets, server.url, s3, bucket, prefix))
    return [
        Row(
            id="P6",
            scenario=(
                f"{count} images (SDXL 1024x1024) through {count} octoai_image_asset assets + "
                f"S3ImageIOManager, one run, in-process executor x {settings.reps} reps"
            ),
            baseline="the same calls as a plain loop: OctoAIClient.generate + boto3 put_object",
            figure="asset run time / loop time",
            unit="x",
            samples=[a / b for a, b in zip(asset_s, loop_s, strict=True)],
            target=1.5,
            details={
                "asset_run_s": [round(t, 2) for t in asset_s],
                "loop_s": [round(t, 2) for t in loop_s],
                "asset_ms_per_image": [round(t / count * 1000) for t in asset_s],
                "loop_ms_per_image": [round(t / count * 1000) for t in loop_s],
            },
        )
    ]
