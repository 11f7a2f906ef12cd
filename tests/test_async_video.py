"""Async video jobs from Dagster: submit asset, sensor ticks, MP4s stored in SeaweedFS.

The images' async path (ledger, ticker, sensor, persist runs) for ``POST /generate/svd``,
over real HTTP to the session's local server, with a sqlite instance, the sensor evaluated
with ``build_sensor_context`` and each requested run materialized as the daemon would. The
ledger is on SeaweedFS too, shared with an image job: each sensor polls its own kind.
"""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import io
import json
from typing import Any

import av
import boto3
import pytest
from _support import module_instance, s3_images
from dagster import (
    DagsterInstance,
    Definitions,
    RunRequest,
    StaticPartitionsDefinition,
    build_sensor_context,
    materialize,
)
from dagster._core.definitions.sensor_definition import SensorExecutionData

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.api.video import SVD_FRAMES
from dagster_octoai.assets import octoai_image_asset
from dagster_octoai.async_assets import octoai_async_results_asset, octoai_async_submit_asset
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.sensors import octoai_async_sensor
from dagster_octoai.storage.ledger import JobState
from dagster_octoai.storage.ticker import AsyncSensorSettings
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs
from dagster_octoai.video_assets import (
    S3VideoIOManager,
    octoai_async_video_results_asset,
    octoai_async_video_submit_asset,
)

__all__ = ["module_instance", "s3_bucket", "seaweedfs"]  # fixtures used by this module

pytestmark = pytest.mark.timeout(240)


def _tick(
    sensor: Any, defs: Definitions, instance: DagsterInstance, resources: dict[str, Any]
) -> SensorExecutionData:
    """One tick as the daemon runs it: evaluate, then add the partitions it asks for."""
    with build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        definitions=defs,
        resources=resources,
    ) as context:
        data = sensor.evaluate_tick(context)
    for req in data.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return data


def _tick_until_requested(
    sensor: Any, defs: Definitions, instance: DagsterInstance, resources: dict[str, Any]
) -> list[RunRequest]:
    for _ in range(100):
        data = _tick(sensor, defs, instance, resources)
        if data.run_requests:
            return list(data.run_requests)
    raise AssertionError(f"no run requested after 100 ticks: {data.skip_message}")


def test_async_video_submit_sensor_and_results_in_seaweedfs(
    octoai_server: Any, seaweedfs: SeaweedFS, s3_bucket: str, instance: DagsterInstance
) -> None:
    token = octoai_server.token or "any-token"
    octoai = OctoAIResource(token=token, base_url=octoai_server.url)
    ledger_resource = JobLedgerResource(
        bucket=s3_bucket,
        prefix="jobs",
        endpoint_url=seaweedfs.endpoint_url,
        region_name=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
        addressing_style="path",
    )
    images = s3_images(seaweedfs, s3_bucket, prefix="img")
    videos = S3VideoIOManager(**{**images.model_dump(exclude={"s3"}), "prefix": "vid"})
    items = StaticPartitionsDefinition(["sku-1", "sku-2"])
    shots = octoai_image_asset(
        "product_shot",
        {"engine": "sdxl", "steps": 4, "seed": 3, "width": 1344, "height": 768},
        prompt_template="a studio photo of {partition_key}",
        partitions_def=items,
    )
    clips = octoai_async_video_results_asset("clips")
    clip_jobs = octoai_async_video_submit_asset(
        "clip_jobs",
        image="product_shot",
        template={"seed": 21, "fps": 6, "motion_scale": 0.3},
        results_asset=clips,
        partitions_def=items,
    )
    # An image job in the same ledger: each sensor polls the kind its asset stores.
    stills = octoai_async_results_asset("stills")
    still_jobs = octoai_async_submit_asset(
        "still_jobs", [{"prompt": "a fox", "engine": "sd", "seed": 5}], results_asset=stills
    )
    settings = AsyncSensorSettings(max_concurrent_polls=2)
    video_sensor = octoai_async_sensor(asset=clips, name="clip_sensor", settings=settings)
    image_sensor = octoai_async_sensor(asset=stills, name="still_sensor", settings=settings)
    resources: dict[str, Any] = {
        "octoai": octoai,
        "octoai_ledger": ledger_resource,
        "io_manager": images,
        "video_io_manager": videos,
    }
    defs = Definitions(
        assets=[shots, clip_jobs, clips, still_jobs, stills],
        sensors=[video_sensor, image_sensor],
        resources=resources,
    )
    sensor_resources = {"octoai": octoai, "octoai_ledger": ledger_resource}

    before = octoai_server.stats()
    submitted = materialize(
        [shots, clip_jobs], partition_key="sku-2", resources=resources, instance=instance
    )
    assert submitted.success
    assert materialize([still_jobs], resources=resources, instance=instance).success
    (sub,) = submitted.asset_materializations_for_node("clip_jobs")
    assert sub.metadata["submitted"].value == 1 and sub.metadata["results_asset"].value == "clips"
    (response_id,) = sub.metadata["response_ids"].value  # type: ignore[misc]

    ledger = ledger_resource.get_ledger()
    kinds = {r.kind: r for r in ledger.iter_records()}
    assert set(kinds) == {"image", "video"}
    assert kinds["video"].response_id == response_id and kinds["video"].engine == "svd"
    assert kinds["video"].partition_key == "sku-2" and kinds["video"].asset_key == "clips"

    (run_request,) = _tick_until_requested(video_sensor, defs, instance, sensor_resources)
    assert run_request.partition_key == response_id  # never the image job's
    result = materialize(
        [clips],
        partition_key=response_id,
        tags=dict(run_request.tags),
        resources=resources,
        instance=instance,
    )
    assert result.success
    (mat,) = result.asset_materializations_for_node("clips")
    md: dict[str, Any] = {k: v.value for k, v in mat.metadata.items()}
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
    assert md["response_id"] == response_id and md["attempts"] == 1
    assert md["manifest"].endswith(f"vid/clips/partition={response_id}/manifest.json")
    assert ledger.get(kinds["video"].job_id).state is JobState.PERSISTED  # type: ignore[union-attr]

    s3 = boto3.client(
        "s3",
        endpoint_url=seaweedfs.endpoint_url,
        region_name=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
    )
    base = f"vid/clips/partition={response_id}"
    manifest = json.loads(
        s3.get_object(Bucket=s3_bucket, Key=f"{base}/manifest.json")["Body"].read()
    )
    (record,) = manifest["results"]
    assert record["response_id"] == response_id
    assert record["request"]["engine"] == "svd" and record["request"]["body"]["seed"] == 21
    (video,) = record["images"]
    assert video["key"].startswith(f"{base}/_objects/") and video["key"].endswith("-seed21.mp4")
    assert s3.head_object(Bucket=s3_bucket, Key=video["key"])["ContentType"] == "video/mp4"
    data = s3.get_object(Bucket=s3_bucket, Key=video["key"])["Body"].read()
    with av.open(io.BytesIO(data), mode="r") as container:
        assert len(list(container.decode(video=0))) == SVD_FRAMES
    # The stored clip is the one a direct render of the same request and seed makes.
    with OctoAIClient(token=token, base_url=octoai_server.url) as client:
        direct = client.generate_video(kinds["video"].request_model())
    assert direct.videos[0].data == data

    # The image sensor collects the image job only; the video job is persisted already.
    (still_request,) = _tick_until_requested(image_sensor, defs, instance, sensor_resources)
    assert still_request.partition_key == kinds["image"].response_id
    after = octoai_server.stats()
    # Two async jobs (the still and the clip), each paid once; two clips rendered (the
    # job's and the direct one).
    assert after["async_jobs"]["submitted"] - before["async_jobs"]["submitted"] == 2
    svd = after["generations_by_engine"]["svd"] - before["generations_by_engine"].get("svd", 0)
    assert svd == 2

    # Submitting the same partition again: explicit seed, persisted, so nothing is paid.
    again = materialize(
        [shots, clip_jobs],
        selection=[clip_jobs],
        partition_key="sku-2",
        resources=resources,
        instance=instance,
    )
    (resub,) = again.asset_materializations_for_node("clip_jobs")
    assert resub.metadata["resumed"].value == 1 and resub.metadata["submitted"].value == 0
    assert octoai_server.stats()["async_jobs"]["submitted"] == after["async_jobs"]["submitted"]
