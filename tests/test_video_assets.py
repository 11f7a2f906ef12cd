"""A partitioned video asset materialized from an upstream image asset into SeaweedFS."""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import io
import json
from pathlib import Path
from typing import Any

import av
import boto3
from _support import ephemeral_instance, octoai, s3_images
from dagster import DagsterInstance, StaticPartitionsDefinition, job, materialize, op
from PIL import Image

from dagster_octoai.api.video import SVD_FRAMES
from dagster_octoai.assets import octoai_image_asset
from dagster_octoai.resources import OctoAIResource
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs
from dagster_octoai.video_assets import (
    LocalVideoIOManager,
    S3VideoIOManager,
    octoai_video_asset,
    octoai_video_op,
)

__all__ = ["ephemeral_instance", "octoai", "s3_bucket", "seaweedfs"]  # fixtures used by this module


def test_partitioned_video_from_upstream_image_in_seaweedfs(
    octoai: OctoAIResource,
    octoai_server: Any,
    seaweedfs: SeaweedFS,
    s3_bucket: str,
    instance: DagsterInstance,
) -> None:
    items = StaticPartitionsDefinition(["sku-1", "sku-2"])
    shots = octoai_image_asset(
        "product_shot",
        {"engine": "sdxl", "steps": 4, "seed": 3, "width": 1344, "height": 768},
        prompt_template="a studio photo of {partition_key}",
        partitions_def=items,
    )
    clips = octoai_video_asset(
        "turntable",
        image="product_shot",
        template={"seed": 21, "fps": 6, "motion_scale": 0.3},
        partitions_def=items,
    )
    images = s3_images(seaweedfs, s3_bucket, prefix="img")
    videos = S3VideoIOManager(**{**images.model_dump(exclude={"s3"}), "prefix": "vid"})
    resources = {"octoai": octoai, "io_manager": images, "video_io_manager": videos}

    before = octoai_server.stats()["generation_requests"]
    result = materialize(
        [shots, clips], partition_key="sku-2", resources=resources, instance=instance
    )
    assert result.success
    assert octoai_server.stats()["generation_requests"] - before == 2  # one image, one video
    (mat,) = result.asset_materializations_for_node("turntable")
    md: dict[str, Any] = {k: v.value for k, v in mat.metadata.items()}
    assert mat.partition == "sku-2"
    assert (md["seed"], md["frames"], md["fps"], md["width"], md["height"]) == (
        21,
        SVD_FRAMES,
        6.0,
        1024,
        576,
    )
    assert md["duration_s"] == round(SVD_FRAMES / 6, 3)
    assert md["parameters"] == {"seed": 21, "fps": 6, "motion_scale": 0.3}
    assert md["poster"].startswith("![poster frame, seed 21](data:image/png;base64,")
    assert len(md["poster"]) < 40_000 and md["reused"] is False

    s3 = boto3.client(
        "s3",
        endpoint_url=seaweedfs.endpoint_url,
        region_name=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
    )
    base = "vid/turntable/partition=sku-2"
    manifest = json.loads(
        s3.get_object(Bucket=s3_bucket, Key=f"{base}/manifest.json")["Body"].read()
    )
    (result_record,) = manifest["results"]
    assert result_record["request"]["engine"] == "svd"
    assert result_record["request"]["body"]["seed"] == 21
    assert result_record["request"]["body"]["image"]  # the full request, picture included
    (video,) = result_record["images"]
    assert video["key"].startswith(f"{base}/_objects/") and video["key"].endswith("-seed21.mp4")
    head = s3.head_object(Bucket=s3_bucket, Key=video["key"])
    assert head["ContentType"] == "video/mp4"
    data = s3.get_object(Bucket=s3_bucket, Key=video["key"])["Body"].read()
    assert video["bytes"] == len(data)
    with av.open(io.BytesIO(data), mode="r") as container:
        assert len(list(container.decode(video=0))) == SVD_FRAMES

    # The same request with its explicit seed again: the stored clip is reused, not paid for.
    before = octoai_server.stats()["generation_requests"]
    again = materialize(
        [shots, clips],
        partition_key="sku-2",
        resources=resources,
        instance=instance,
        selection=["turntable"],
    )
    assert again.success
    assert octoai_server.stats()["generation_requests"] == before
    (mat2,) = again.asset_materializations_for_node("turntable")
    assert mat2.metadata["reused"].value is True
    assert (
        json.loads(s3.get_object(Bucket=s3_bucket, Key=f"{base}/manifest.json")["Body"].read())
        == manifest
    )


def test_video_op_in_a_job_stores_locally(octoai: OctoAIResource, tmp_path: Path) -> None:
    @op
    def still() -> Image.Image:
        return Image.new("RGB", (96, 96), "teal")

    clip = octoai_video_op("clip", {"seed": 4, "fps": 5})

    @job(
        resource_defs={
            "octoai": octoai,
            "video_io_manager": LocalVideoIOManager(base_dir=str(tmp_path), prefix="v"),
        }
    )
    def animate() -> None:
        clip(still())

    result = animate.execute_in_process()
    assert result.success
    stored = list(tmp_path.rglob("*-seed4.mp4"))
    assert len(stored) == 1 and "_ops" in stored[0].parts
    with av.open(str(stored[0]), mode="r") as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (768, 768)  # square input: the square size
        assert len(list(container.decode(video=0))) == SVD_FRAMES
