"""One S3 configuration: dagster-aws's ``S3Resource`` as the connection of the image IO
manager and the job ledger, against SeaweedFS.

An IO manager built on an ``S3Resource`` stores and loads images; the job ledger on the same
resource keeps an async batch's records; both beside the resource itself in one
``Definitions``. The connection fields are the fallback: setting them as well is refused,
naming them.
"""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import re
from typing import Any

import pytest
from _support import octoai
from dagster import AssetIn, DagsterInstance, Definitions, asset, materialize
from dagster_aws.s3 import S3Resource

from dagster_octoai import GeneratedImage, JobLedgerResource, S3ImageIOManager, octoai_image_asset
from dagster_octoai.async_assets import octoai_async_results_asset, octoai_async_submit_asset
from dagster_octoai.resources import OctoAIResource
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["octoai", "s3_bucket", "seaweedfs"]  # fixtures used by this module


@pytest.fixture
def s3(seaweedfs: SeaweedFS) -> S3Resource:
    """dagster-aws's S3Resource, pointed at SeaweedFS."""
    return S3Resource(
        endpoint_url=seaweedfs.endpoint_url,
        region_name=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
    )


def test_an_io_manager_on_an_s3_resource_stores_and_loads(
    s3: S3Resource, s3_bucket: str, seaweedfs: SeaweedFS, octoai: OctoAIResource
) -> None:
    fox = octoai_image_asset(
        "fox", {"engine": "sd", "prompt": "a red fox", "seed": 21}, io_manager_key="images"
    )

    @asset(ins={"fox": AssetIn()})
    def fox_seeds(fox: list[GeneratedImage]) -> list[int]:
        return [image.seed for image in fox]

    images = S3ImageIOManager(bucket=s3_bucket, prefix="shared", s3=s3)
    result = materialize([fox, fox_seeds], resources={"s3": s3, "images": images, "octoai": octoai})
    assert result.success
    assert result.output_for_node("fox_seeds") == [21]  # loaded back through the S3Resource
    meta = result.asset_materializations_for_node("fox")[0].metadata
    assert meta["dagster/uri"].value == f"s3://{s3_bucket}/shared/fox/"
    keys = {
        o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    }
    # The manifest, and the image under the write that committed it (layout v2).
    assert "shared/fox/manifest.json" in keys and len(keys) == 2
    (image,) = keys - {"shared/fox/manifest.json"}
    assert re.fullmatch(r"shared/fox/_objects/[0-9TZ]+-[0-9a-f]+/000-seed21\.jpg", image), image


def test_the_ledger_on_the_same_s3_resource_records_async_jobs(
    s3: S3Resource, s3_bucket: str, seaweedfs: SeaweedFS, octoai: OctoAIResource
) -> None:
    results = octoai_async_results_asset("herons", io_manager_key="images")
    submit = octoai_async_submit_asset(
        "heron_jobs",
        [{"engine": "sd", "prompt": "a heron", "seed": s} for s in (1, 2)],
        results_asset=results,
    )
    # One S3Resource, named once: the IO manager and the ledger both use it.
    defs = Definitions(
        assets=[submit, results],
        resources={
            "s3": s3,
            "octoai": octoai,
            "images": S3ImageIOManager(bucket=s3_bucket, s3=s3),
            "octoai_ledger": JobLedgerResource(bucket=s3_bucket, prefix="jobs", s3=s3),
        },
    )
    with DagsterInstance.ephemeral() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, asset_selection=[submit.key]).success
    listed = seaweedfs.client().list_objects_v2(Bucket=s3_bucket, Prefix="jobs/jobs/")
    assert len(listed.get("Contents", [])) == 2  # one record per job, in S3
    ledger = JobLedgerResource(bucket=s3_bucket, prefix="jobs", s3=s3).get_ledger()
    records = [ledger.get(ledger.job_id_of_marker(m)) for m in ledger.list_open()]
    assert sorted(r.request_model().seed for r in records if r is not None) == [1, 2]


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (
            lambda s3: S3ImageIOManager(bucket="b-1", s3=s3, endpoint_url="http://x:1"),
            "endpoint_url",
        ),
        (
            lambda s3: S3ImageIOManager(bucket="b-1", s3=s3, addressing_style="path"),
            "addressing_style",
        ),
        (lambda s3: JobLedgerResource(bucket="b-1", s3=s3, region_name="eu-west-1"), "region_name"),
    ],
)
def test_one_configuration_the_fields_are_the_fallback_only(
    s3: S3Resource, make: Any, named: str
) -> None:
    resource = make(s3)
    with pytest.raises(ValueError, match=f"{named} cannot be set with s3=S3Resource"):
        resource.get_ledger() if isinstance(resource, JobLedgerResource) else resource.preflight()


def test_something_else_as_s3_is_refused_naming_the_field() -> None:
    with pytest.raises(TypeError, match=r"s3: expected a dagster_aws\.s3\.S3Resource, got str"):
        S3ImageIOManager(bucket="b-1", s3="my-s3").preflight()
