"""Preflight refuses what storage would refuse, before a single image is paid for.

Random-seed requests read nothing from the store on the way, so without the preflight
the first sign of a bad store is the failed write, after the images were generated.
Each case runs the asset against the local server (its count of paid generations is
the figure) and SeaweedFS or a local directory.
"""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

from typing import Any

import pytest
from _support import octoai, s3_images
from dagster import materialize

from dagster_octoai.assets import octoai_image_asset
from dagster_octoai.async_assets import octoai_async_results_asset, octoai_async_submit_asset
from dagster_octoai.io_managers import LocalImageIOManager
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.storage import ImageStore, S3Backend, StorageError
from dagster_octoai.storage.layout import longest_key
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["octoai", "s3_bucket", "seaweedfs"]  # fixtures used by this module

REQUEST = {"engine": "sd", "prompt": "a kite", "steps": 2}  # random seed: no reuse lookup


def _paid(octoai_server: Any) -> int:
    paid: int = octoai_server.stats()["paid_generations"]
    return paid


def _refused(asset_def: Any, resources: dict[str, Any], octoai_server: Any) -> StorageError:
    before = _paid(octoai_server)
    with pytest.raises(StorageError) as info:
        materialize([asset_def], resources=resources)
    assert "nothing was generated or paid for" in str(info.value)
    assert _paid(octoai_server) == before
    return info.value


def _objects(s3: SeaweedFS, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_key_over_s3s_1024_bytes_is_refused_before_paying(
    octoai: OctoAIResource, octoai_server: Any, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    kite = octoai_image_asset("kite", REQUEST, io_manager_key="images")
    images = s3_images(seaweedfs, s3_bucket, prefix="/".join(["deep" * 20] * 12))
    err = _refused(kite, {"octoai": octoai, "images": images}, octoai_server)
    assert "over S3's 1,024-byte limit" in str(err) and "shorten" in str(err)
    assert _objects(seaweedfs, s3_bucket) == []


def test_the_longest_key_a_write_uses_is_the_one_checked(
    seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    asset_key = ["a" * 100] * 9  # kept segments are at most 100 characters
    bare = ImageStore(S3Backend(seaweedfs.client(), s3_bucket))
    manifest = len(bare.manifest_key(asset_key, None))
    longest = len(longest_key(bare.output_key(asset_key, None)))
    # A prefix that leaves the manifest's key under the limit and the image keys over it.
    prefix = "p" * (1024 - (manifest + longest) // 2)
    store = ImageStore(S3Backend(seaweedfs.client(), s3_bucket), prefix=prefix)
    assert len(store.manifest_key(asset_key, None)) <= 1024
    with pytest.raises(StorageError, match="1,024-byte limit"):
        store.preflight(asset_key, None)
    store.preflight(["a" * 100], "2024-01-01")
    assert _objects(seaweedfs, s3_bucket) == []  # the probe object is gone


def test_read_only_credentials_are_refused_before_paying(
    octoai: OctoAIResource, octoai_server: Any, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    kite = octoai_image_asset("kite", REQUEST, io_manager_key="images")
    images = s3_images(
        seaweedfs,
        s3_bucket,
        aws_access_key_id=seaweedfs.read_only_access_key,
        aws_secret_access_key=seaweedfs.read_only_secret_key,
    )
    err = _refused(kite, {"octoai": octoai, "images": images}, octoai_server)
    assert "S3 refused the credentials for put" in str(err)
    assert seaweedfs.read_only_secret_key not in str(err)


def test_a_store_that_ignores_conditional_writes_is_refused(
    seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    client = seaweedfs.client()

    def drop_condition(params: dict[str, Any], **_: Any) -> None:
        # What an S3-compatible store without conditional writes does: ignore the header.
        params["headers"].pop("If-None-Match", None)

    client.meta.events.register("before-call.s3.PutObject", drop_condition)
    store = ImageStore(S3Backend(client, s3_bucket), prefix="p")
    with pytest.raises(StorageError, match="ignores conditional writes"):
        store.preflight(["kite"], None)
    assert _objects(seaweedfs, s3_bucket) == []


def test_a_local_path_segment_over_255_bytes_is_refused_before_paying(
    octoai: OctoAIResource, octoai_server: Any, tmp_path: Any
) -> None:
    kite = octoai_image_asset("kite", REQUEST, io_manager_key="images")
    images = LocalImageIOManager(base_dir=str(tmp_path), prefix="x" * 300)
    err = _refused(kite, {"octoai": octoai, "images": images}, octoai_server)
    assert "255-byte file name limit" in str(err)


def test_the_submit_asset_checks_the_results_key_before_submitting(
    octoai_server: Any, seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Any
) -> None:
    results = octoai_async_results_asset("kites", io_manager_key="images")
    submit = octoai_async_submit_asset("kite_jobs", [REQUEST], results_asset=results)
    # The response id is not known before the POST: the widest partition must fit.
    prefix = "/".join(["deep" * 20] * 11) + "/" + "d" * 9  # 900 characters
    images = s3_images(seaweedfs, s3_bucket, prefix=prefix)
    assert len(images.store.manifest_key(["kites"], "r" * 40).encode()) < 1024
    before = octoai_server.stats()["async_jobs"]["submitted"]
    resources = {
        "octoai": OctoAIResource(token=octoai_server.token, base_url=octoai_server.url),
        "octoai_ledger": JobLedgerResource(base_dir=str(tmp_path / "ledger"), fsync=False),
        "images": images,
    }
    with pytest.raises(StorageError, match="1,024-byte limit"):
        materialize([submit], resources=resources)
    assert octoai_server.stats()["async_jobs"]["submitted"] == before
