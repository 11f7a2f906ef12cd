"""P3: persisting generated images through the S3 IO manager against raw boto3 ``put_object``.

200 SDXL 1024x1024 JPEGs of about 1.4 MB (the server's ``detail=1.0`` noise; one seed
and 200 prompts, so every image differs) are generated once. Each repetition then
stores them twice on SeaweedFS, alternating the order: through
``S3ImageIOManager.handle_output`` (its defaults: 8 uploads in flight, adaptive
retries; it also pays the SHA-256, the object metadata, the thumbnail, the manifest
and the fingerprint index), and as raw boto3 ``put_object`` calls of the same bytes
from 8 threads. Both start from decoded bytes: the base64 decode (about 18 ms per
1.4 MB image here, CPython's ``a2b_base64``) is paid once per image wherever
``.data`` is first read, and P1, P4 and P6 count it. After the first repetition
every stored object is read back and compared with the decoded bytes.
"""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.config import Config
from dagster import build_output_context

from dagster_octoai.api.batch import ImageBatch
from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.api.models import ImageGenerationRequest, ImageGenerationResponse
from dagster_octoai.io_managers import S3ImageIOManager
from dagster_octoai.testing.seaweedfs import SeaweedFS

from ._common import TOKEN, Row, Settings, octoai_server, s3_image_io_manager, seaweedfs

#: The IO manager's default uploads in flight; the baseline uses the same.
CONCURRENCY = 8
DETAIL = 1.0
#: At least this many paired repetitions in a full run (single pairs range about
#: 0.7x-1.1x here: SeaweedFS grows a new 64 MB volume every ~45 images).
MIN_REPS = 5
#: Pairs of the informational row with the fingerprint index on.
INDEX_REPS = 2


def big_image_requests(count: int, tag: str) -> list[ImageGenerationRequest]:
    """``count`` distinct ~1.4 MB SDXL requests (one seed: the server caches its backdrop)."""
    return [
        ImageGenerationRequest(prompt=f"{tag} image {i}", engine="sdxl", seed=7)
        for i in range(count)
    ]


def _io_manager(s3: SeaweedFS, bucket: str, *, fingerprint_index: bool = False) -> S3ImageIOManager:
    return s3_image_io_manager(
        s3, bucket, "bench", max_concurrency=CONCURRENCY, fingerprint_index=fingerprint_index
    )


def _pairs(
    io: S3ImageIOManager,
    raw_client: Any,
    bucket: str,
    results: list[ImageGenerationResponse],
    blobs: list[bytes],
    reps: int,
    tag: str,
) -> tuple[list[float], list[float]]:
    """``reps`` timed pairs (IO manager, raw boto3), the order alternating."""
    io_times: list[float] = []
    raw_times: list[float] = []
    for rep in range(reps):
        key = f"{tag}{rep}"
        if rep % 2 == 0:
            io_times.append(_persist_io(io, results, key))
            raw_times.append(_persist_raw(raw_client, bucket, blobs, key))
        else:
            raw_times.append(_persist_raw(raw_client, bucket, blobs, key))
            io_times.append(_persist_io(io, results, key))
    return io_times, raw_times


def _persist_io(io: S3ImageIOManager, results: list[ImageGenerationResponse], key: str) -> float:
    batch = ImageBatch(results)
    context = build_output_context(asset_key=[key], run_id=secrets.token_hex(8))
    started = time.perf_counter()
    io.handle_output(context, batch)
    return time.perf_counter() - started


def _persist_raw(client: Any, bucket: str, blobs: list[bytes], key: str) -> float:
    def put(item: tuple[int, bytes]) -> None:
        i, data = item
        client.put_object(
            Bucket=bucket, Key=f"raw/{key}/{i:03d}.jpg", Body=data, ContentType="image/jpeg"
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        list(pool.map(put, enumerate(blobs)))
    return time.perf_counter() - started


def run(settings: Settings) -> list[Row]:
    count = settings.n(200, 4)
    with octoai_server(detail=DETAIL, replicas=4) as server, seaweedfs() as s3:
        with OctoAIClient(TOKEN, base_url=server.url, max_concurrency=4) as client:
            requests = big_image_requests(count, "p3")
            responses = client.generate_many(requests)
        results = responses
        blobs = [r.images[0].data for r in results]
        bucket = "bench-" + secrets.token_hex(4)
        raw_client = s3.client(
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=CONCURRENCY + 2)
        )
        raw_client.create_bucket(Bucket=bucket)
        io = _io_manager(s3, bucket)
        io.store.backend.check()  # both clients built and connected before any timing
        raw_client.head_bucket(Bucket=bucket)
        reps = settings.reps if settings.quick else max(settings.reps, MIN_REPS)
        io_times, raw_times = _pairs(io, raw_client, bucket, results, blobs, reps, "p3_rep")
        identical = _stored_bytes_match(raw_client, bucket, io, "p3_rep0", blobs)
        indexed = _io_manager(s3, bucket, fingerprint_index=True)
        index_reps = settings.n(INDEX_REPS, 1)
        index_io, index_raw = _pairs(
            indexed, raw_client, bucket, results, blobs, index_reps, "p3_index"
        )
    total_mb = sum(len(b) for b in blobs) / 1e6
    what = (
        f"persist {count} images of {total_mb / count:.2f} MB (SDXL JPEG) through S3ImageIOManager"
    )
    where = f"{CONCURRENCY} uploads in flight, SeaweedFS"
    return [
        _row(
            "P3",
            f"{what}, {where} x {reps} reps",
            io_times,
            raw_times,
            total_mb,
            target=0.85,
            details={"stored_bytes_identical": identical},
            checks={"stored bytes identical to the decoded bytes": bool(identical)},
        ),
        _row(
            "P3-index",
            f"informational: {what} with fingerprint_index=True (one more PUT per result), "
            f"{where} x {index_reps} reps",
            index_io,
            index_raw,
            total_mb,
            target=None,
        ),
    ]


def _row(
    rid: str,
    scenario: str,
    io_times: list[float],
    raw_times: list[float],
    total_mb: float,
    *,
    target: float | None,
    details: dict[str, Any] | None = None,
    checks: dict[str, bool] | None = None,
) -> Row:
    return Row(
        id=rid,
        scenario=scenario,
        baseline=f"raw boto3 put_object of the same bytes, {CONCURRENCY} threads",
        figure="IO manager throughput / boto3 throughput",
        unit="x",
        samples=[r / i for r, i in zip(raw_times, io_times, strict=True)],
        target=target,
        comparison=">=",
        details={
            "io_manager_s": [round(t, 3) for t in io_times],
            "boto3_s": [round(t, 3) for t in raw_times],
            "io_manager_MB_per_s": [round(total_mb / t, 1) for t in io_times],
            "boto3_MB_per_s": [round(total_mb / t, 1) for t in raw_times],
            **(details or {}),
        },
        checks=checks or {},
    )


def _stored_bytes_match(
    client: Any, bucket: str, io: S3ImageIOManager, key: str, blobs: list[bytes]
) -> bool:
    """Every stored image, read back with boto3, equals the image the API returned."""
    manifest = io.store.read_manifest([key], None)
    if manifest is None:
        return False
    stored = [im for r in manifest["results"] for im in r["images"]]
    if len(stored) != len(blobs):
        return False
    for im in stored:
        body = client.get_object(Bucket=bucket, Key=im["key"])["Body"].read()
        if body != blobs[im["index"]]:
            return False
    return True
