"""P6: what Dagster and the package add around the same calls: 100 images, asset vs loop.

The issue's scenario is "100 images through asset + IO manager, in-process executor"
against "the same calls as a plain loop (client + boto3)". The asset side is the
normal way to run such a batch with the package: **one** ``octoai_image_asset``
materialization of ``octoai_image_batch_asset`` (100 SDXL 1024x1024 requests of one image each,
explicit seeds, the built-in asset checks on) whose streamed ``ImageBatch`` is stored
by ``S3ImageIOManager`` on SeaweedFS, in one run with the in-process executor on a
sqlite ``DagsterInstance`` (``DagsterInstance.local_temp``, as ``dagster dev`` uses;
one instance for every run of the scenario, created by the untimed warm-up run).
The loop makes the same 100 ``OctoAIClient.generate`` calls and 100 boto3
``put_object`` calls of the image bytes, one after the other.

Both sides run at the same concurrency, so the figure is overhead and not
parallelism: the resource and the loop's client have one generation in flight
(``max_concurrency=1``) and the IO manager one upload (``max_concurrency=1``).
The asset side also pays what the loop does not: SHA-256, object metadata, one
thumbnail, the manifest, the fingerprint index, the checks and Dagster's event log.

An earlier version modelled the scenario as 100 separate one-image assets; that
measures Dagster's per-step cost (about 40 sqlite commits per step) rather than 100
images through an asset, and is kept as the informational row ``P6-assets`` (fewer
assets, one repetition), with no target. Each repetition writes under a fresh prefix,
so nothing is reused. One untimed warm-up run of each comes first (Dagster's storage
modules are imported on first use).
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from dagster import AssetsDefinition, DagsterInstance, materialize

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.assets import octoai_image_asset, octoai_image_batch_asset
from dagster_octoai.resources import OctoAIResource
from dagster_octoai.testing.seaweedfs import SeaweedFS

from ._common import TOKEN, Row, Settings, octoai_server, s3_image_io_manager, seaweedfs

#: Generations and uploads in flight, on both sides.
CONCURRENCY = 1
#: At least this many paired repetitions in a full run: one pair takes about 6 s, and
#: single pairs on this box range from 1.3x to 1.8x, so three made a noisy median.
MIN_REPS = 5


def _request(i: int) -> dict[str, Any]:
    return {"prompt": f"a teapot, style {i}", "engine": "sdxl", "seed": 1000 + i}


def _batch_asset(count: int) -> AssetsDefinition:
    return octoai_image_batch_asset(
        "teapots",
        {"engine": "sdxl"},
        lambda _partition, _inputs: [_request(i) for i in range(count)],
        io_manager_key="images",
    )


def _one_image_assets(count: int) -> list[AssetsDefinition]:
    return [
        octoai_image_asset(f"teapot_{i:03d}", _request(i), io_manager_key="images")
        for i in range(count)
    ]


def _asset_run(
    instance: DagsterInstance,
    assets: Sequence[AssetsDefinition],
    url: str,
    s3: SeaweedFS,
    bucket: str,
    prefix: str,
) -> float:
    resources = {
        "octoai": OctoAIResource(token=TOKEN, base_url=url, max_concurrency=CONCURRENCY),
        "images": s3_image_io_manager(s3, bucket, prefix, max_concurrency=CONCURRENCY),
    }
    started = time.perf_counter()
    result = materialize(assets, instance=instance, resources=resources)
    elapsed = time.perf_counter() - started
    assert result.success
    return elapsed


def _loop(count: int, url: str, s3: SeaweedFS, bucket: str, prefix: str) -> float:
    started = time.perf_counter()
    client = OctoAIClient(TOKEN, base_url=url, max_concurrency=CONCURRENCY)
    s3_client = s3.client()
    for i in range(count):
        response = client.generate(_request(i))
        image = response.images[0]
        s3_client.put_object(
            Bucket=bucket,
            Key=f"{prefix}/teapots/{i:03d}-seed{image.seed}.jpg",
            Body=image.data,
            ContentType="image/jpeg",
        )
    client.close()
    return time.perf_counter() - started


def _ratio_row(
    rid: str,
    scenario: str,
    asset_s: list[float],
    loop_s: list[float],
    count: int,
    target: float | None,
) -> Row:
    return Row(
        id=rid,
        scenario=scenario,
        baseline="the same calls as a plain loop: OctoAIClient.generate + boto3 put_object",
        figure="asset run time / loop time",
        unit="x",
        samples=[a / b for a, b in zip(asset_s, loop_s, strict=True)],
        target=target,
        details={
            "asset_run_s": [round(t, 2) for t in asset_s],
            "loop_s": [round(t, 2) for t in loop_s],
            "asset_ms_per_image": [round(t / count * 1000) for t in asset_s],
            "loop_ms_per_image": [round(t / count * 1000) for t in loop_s],
        },
    )


def run(settings: Settings) -> list[Row]:
    count = settings.n(100, 3)
    reps = settings.reps if settings.quick else max(settings.reps, MIN_REPS)
    per_asset = settings.n(20, 1)
    batch = [_batch_asset(count)]
    asset_s: list[float] = []
    loop_s: list[float] = []
    with (
        octoai_server(replicas=4) as server,
        seaweedfs() as s3,
        tempfile.TemporaryDirectory() as home,
    ):
        # One instance for every run, as a deployment has: its sqlite files are created
        # and migrated by the first run (the warm-up), not in a timed one.
        instance = DagsterInstance.local_temp(home)
        bucket = "bench-" + secrets.token_hex(4)
        s3.client().create_bucket(Bucket=bucket)
        if not settings.quick:
            # Untimed: the first run in a process imports half of Dagster's storage layer.
            _asset_run(instance, [_batch_asset(1)], server.url, s3, bucket, "p6-warmup")
            _loop(1, server.url, s3, bucket, "p6-warmup-loop")
        for rep in range(reps):
            prefix = f"p6-{rep}-{secrets.token_hex(3)}"
            if rep % 2 == 0:
                asset_s.append(_asset_run(instance, batch, server.url, s3, bucket, prefix))
                loop_s.append(_loop(count, server.url, s3, bucket, prefix + "-loop"))
            else:
                loop_s.append(_loop(count, server.url, s3, bucket, prefix + "-loop"))
                asset_s.append(_asset_run(instance, batch, server.url, s3, bucket, prefix))
        prefix = f"p6-assets-{secrets.token_hex(3)}"
        one_image = _one_image_assets(per_asset)
        assets_s = [_asset_run(instance, one_image, server.url, s3, bucket, prefix)]
        assets_loop_s = [_loop(per_asset, server.url, s3, bucket, prefix + "-loop")]
    one_at_a_time = f"{CONCURRENCY} generation and {CONCURRENCY} upload in flight"
    return [
        _ratio_row(
            "P6",
            f"{count} images (SDXL 1024x1024) through one octoai_image_batch_asset "
            f"materialization + S3ImageIOManager, in-process executor, {one_at_a_time}, "
            f"x {reps} reps",
            asset_s,
            loop_s,
            count,
            1.5,
        ),
        _ratio_row(
            "P6-assets",
            f"informational: {per_asset} images through {per_asset} one-image "
            f"octoai_image_asset assets in one run (Dagster's per-step cost), {one_at_a_time}, x 1",
            assets_s,
            assets_loop_s,
            per_asset,
            None,
        ),
    ]
