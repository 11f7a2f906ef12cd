"""Runs over a partition range (single-run backfills) store each partition where a run of it would.

A single-run backfill is one run tagged ``dagster/asset_partition_range_start`` and
``..._end``; ``materialize(..., tags=...)`` executes exactly that run. Each partition's
request must be its own (the prompt filled with its key), stored under its own partition
with its own materialization, or the run is refused before anything is sent.
"""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

from typing import Any

import dagster as dg
import pytest
from _support import octoai, s3_images
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from dagster_octoai.api.models import GeneratedImage, ImageGenerationResponse
from dagster_octoai.assets import octoai_image_asset, octoai_image_batch_asset
from dagster_octoai.async_assets import octoai_async_blocking_asset, octoai_async_submit_asset
from dagster_octoai.io_managers import LocalImageIOManager
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.testing.seaweedfs import s3_bucket, seaweedfs

__all__ = ["octoai", "s3_bucket", "seaweedfs"]  # fixtures used by this module

COLORS = ["red", "blue", "green", "amber"]
PARTS = dg.StaticPartitionsDefinition(COLORS)
RANGE = {ASSET_PARTITION_RANGE_START_TAG: "red", ASSET_PARTITION_RANGE_END_TAG: "green"}


@pytest.fixture(params=["s3", "local"])
def images(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "local":
        return LocalImageIOManager(base_dir=str(tmp_path / "images"), prefix="octoai")
    return s3_images(
        request.getfixturevalue("seaweedfs"), request.getfixturevalue("s3_bucket"), prefix="octoai"
    )


def _materializations(result: dg.ExecuteInProcessResult, node: str) -> dict[str, Any]:
    return {
        str(m.partition): {k: getattr(v, "value", v) for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node(node)
    }


def test_a_range_run_sends_one_request_per_partition_stored_under_each(
    octoai: OctoAIResource, octoai_server: Any, images: Any
) -> None:
    foxes = octoai_image_asset(
        "foxes",
        {"engine": "sd", "steps": 2, "seed": 11},
        prompt_template="a {partition_key} fox",
        partitions_def=PARTS,
        io_manager_key="images",
    )
    got: dict[str, list[GeneratedImage]] = {}

    @dg.asset(partitions_def=PARTS)
    def fox_check(context: dg.AssetExecutionContext, foxes: list[GeneratedImage]) -> None:
        got[context.partition_key] = foxes

    resources = {"octoai": octoai, "images": images}
    before = octoai_server.stats()["generation_requests"]
    result = dg.materialize([foxes], resources=resources, tags=RANGE)
    assert result.success
    assert octoai_server.stats()["generation_requests"] - before == 3
    mats = _materializations(result, "foxes")
    assert sorted(mats) == ["blue", "green", "red"]

    store = images.store
    for color in ("red", "blue", "green"):
        # Where a run of that partition alone stores it, with its own request.
        manifest = store.read_manifest(["foxes"], color)
        assert manifest is not None and manifest["partition"] == color
        assert manifest["results"][0]["request"]["body"]["prompt"] == f"a {color} fox"
        uri = store.output_uri(["foxes"], color)
        assert mats[color]["dagster/uri"] == uri and mats[color]["images"] == 1
        assert mats[color]["manifest_uri"] == store.backend.uri(
            store.manifest_key(["foxes"], color)
        )
        assert mats[color]["octoai/generated_images"] == 1
    assert store.read_manifest(["foxes"], None) is None  # nothing at the unpartitioned key
    assert store.read_manifest(["foxes"], "amber") is None  # outside the range

    # Downstream, each partition loads its own image, as after one run per partition.
    for color in ("red", "green"):
        dg.materialize(
            [foxes, fox_check], selection=[fox_check], partition_key=color, resources=resources
        )
        assert [im.request.prompt for im in got[color]] == [f"a {color} fox"]

    # A single-partition run of the same request reuses what the range stored.
    again = dg.materialize([foxes], resources=resources, partition_key="blue")
    assert _materializations(again, "foxes")["blue"]["reused"] == 1  # images reused


def test_a_streamed_range_run_streams_each_partition_under_its_own_key(
    octoai: OctoAIResource, octoai_server: Any, images: Any
) -> None:
    frames = octoai_image_batch_asset(
        "frames",
        {"engine": "sd", "steps": 2},
        lambda key, inputs: [{"prompt": f"{key} frame {i}", "seed": i} for i in range(3)],
        prompt_template="a {partition_key} frame",
        partitions_def=PARTS,
        io_manager_key="images",
    )
    result = dg.materialize([frames], resources={"octoai": octoai, "images": images}, tags=RANGE)
    assert result.success
    mats = _materializations(result, "frames")
    for color in ("red", "blue", "green"):
        manifest = images.store.read_manifest(["frames"], color)
        prompts = sorted(r["request"]["body"]["prompt"] for r in manifest["results"])
        assert prompts == [f"{color} frame {i}" for i in range(3)]
        assert mats[color]["images"] == 3


def test_a_range_run_of_a_user_asset_returning_one_answer_is_refused_before_paying(
    octoai: OctoAIResource, octoai_server: Any, images: Any
) -> None:
    @dg.asset(partitions_def=PARTS, io_manager_key="images")
    def fox(context: dg.AssetExecutionContext, octoai: OctoAIResource) -> ImageGenerationResponse:
        with octoai.get_client(context) as client:
            return client.generate({"prompt": "a fox", "engine": "sd", "steps": 2})

    before = octoai_server.stats()["generation_requests"]
    with pytest.raises(
        Exception, match=r"covers 3 partitions \(red to green\).*Nothing was generated"
    ):
        dg.materialize([fox], resources={"octoai": octoai, "images": images}, tags=RANGE)
    assert octoai_server.stats()["generation_requests"] == before


def test_the_async_assets_refuse_a_range_run_before_submitting(
    octoai: OctoAIResource, octoai_server: Any, images: Any, tmp_path: Any
) -> None:
    request = {"prompt": "a fox", "engine": "sd", "steps": 2, "seed": 3}
    resources = {
        "octoai": octoai,
        "octoai_ledger": JobLedgerResource(base_dir=str(tmp_path / "ledger"), fsync=False),
        "io_manager": images,
    }
    before = octoai_server.stats()["async_jobs"]["submitted"]
    for asset_def in (
        octoai_async_blocking_asset("blocking_foxes", [request], partitions_def=PARTS),
        octoai_async_submit_asset(
            "fox_jobs", [request], results_asset="fox_results", partitions_def=PARTS
        ),
    ):
        with pytest.raises(dg.Failure, match=r"runs one partition per run.*Nothing was submitted"):
            dg.materialize([asset_def], resources=resources, tags=RANGE)
    assert octoai_server.stats()["async_jobs"]["submitted"] == before
