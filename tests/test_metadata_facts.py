"""What a materialization says: one key per fact, ``dagster/uri``, cost, code references.

Real runs of factory assets against the local server, stored in SeaweedFS by the S3 image
IO manager.
"""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import inspect
from typing import Any

import pytest
from _support import s3_images
from dagster import AssetKey, Definitions, EnvVar, StaticPartitionsDefinition, materialize

from dagster_octoai import OctoAIResource, S3ImageIOManager, octoai_image_asset
from dagster_octoai.io_managers import with_image_uris
from dagster_octoai.metadata import image_cost
from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["s3_bucket", "seaweedfs"]  # fixtures used by this module

# Earlier names of facts that have one key now.
DUPLICATE_NAMES = {
    "uri",
    "image_count",
    "removed_count",
    "reused_count",
    "preview",
    "octoai/images",
    "octoai/removed_for_safety",
    "octoai/engine",
    "octoai/prediction_time_ms",
}
products = StaticPartitionsDefinition(["mug", "lamp"])
LINE_OF_POSTERS = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
posters = octoai_image_asset(
    "posters",
    {"engine": "sdxl", "sampler": "HEUN", "num_images": 2, "seed": [1, 2], "steps": 4},
    prompt_template="a poster of a {partition_key}",
    partitions_def=products,
    io_manager_key="images",
)
sketches = octoai_image_asset(
    "sketches", {"engine": "sd", "prompt": "a sketch", "seed": 3}, io_manager_key="images"
)


def _resources(server: LocalOctoAIServer, s3: SeaweedFS, bucket: str, **octoai: Any) -> dict:
    return {
        "octoai": OctoAIResource(token=server.token, base_url=server.url, **octoai),
        "images": s3_images(s3, bucket, prefix="facts"),
    }


def _metadata(result: Any, node: str) -> dict[str, Any]:
    (mat,) = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mat.metadata.items()}


def test_one_key_per_fact_and_the_uri_with_its_partition(
    octoai_server: LocalOctoAIServer, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    result = materialize(
        [posters], partition_key="mug", resources=_resources(octoai_server, seaweedfs, s3_bucket)
    )
    md = _metadata(result, "posters")
    assert md["dagster/uri"] == f"s3://{s3_bucket}/facts/posters/partition=mug/"
    assert not DUPLICATE_NAMES & set(md), DUPLICATE_NAMES & set(md)
    # What the output holds (said once, by whichever records it) ...
    assert md["images"] == 2 and md["seeds"] == [1, 2] and md["removed_for_safety"] == 0
    assert md["engine"] == "sdxl" and md["reused"] == 0
    # ... and what the step generated and paid for.
    assert md["octoai/generated_images"] == 2 and md["octoai/premium_images"] == 2
    assert md["octoai/generated_images/sdxl"] == 2
    # The inline thumbnail stays small: one JPEG of a few KB.
    assert md["thumbnail"].startswith("![seed 1](data:image/jpeg;base64,")
    assert len(md["thumbnail"]) < 20_000


def test_cost_from_the_price_table_premium_samplers_at_twice_the_price(
    octoai_server: LocalOctoAIServer, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    resources = _resources(octoai_server, seaweedfs, s3_bucket, prices={"sdxl": 0.01, "sd": 0.002})
    result = materialize([posters, sketches], partition_key="lamp", resources=resources)
    premium = _metadata(result, "posters")
    regular = _metadata(result, "sketches")
    assert premium["octoai/cost"] == pytest.approx(0.04)  # 2 images, HEUN is premium: 2x
    assert premium["octoai/cost/sdxl"] == pytest.approx(0.04)
    assert regular["octoai/cost"] == pytest.approx(0.002)
    assert regular["octoai/cost/sd"] == pytest.approx(0.002)
    # Numbers, so Dagster plots them over materializations.
    mat = result.asset_materializations_for_node("posters")[0]
    assert type(mat.metadata["octoai/cost/sdxl"]).__name__ == "FloatMetadataValue"
    # Without prices, the cost counts standard images.
    plain = materialize(
        [sketches], partition_key=None, resources=_resources(octoai_server, seaweedfs, s3_bucket)
    )
    assert _metadata(plain, "sketches")["octoai/cost"] == 1.0
    assert image_cost("sdxl", images=2, premium_images=2) == 4.0


def test_a_reused_result_costs_nothing(
    octoai_server: LocalOctoAIServer, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    resources = _resources(octoai_server, seaweedfs, s3_bucket, prices={"sd": 0.002})
    materialize([sketches], resources=resources)
    again = _metadata(materialize([sketches], resources=resources), "sketches")
    assert again["reused"] == 1 and again["images"] == 1
    assert again["octoai/generated_images"] == 0 and again["octoai/cost"] == 0.0


def test_prices_name_engines() -> None:
    with pytest.raises(ValueError, match="prices: 'sdxl-turbo' is not an engine; allowed: sdxl"):
        OctoAIResource(prices={"sdxl-turbo": 0.01})


def test_dagster_uri_is_on_the_definition_where_the_path_is_known(
    octoai_server: LocalOctoAIServer, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    defs = with_image_uris(
        Definitions(
            assets=[posters, sketches],
            resources=_resources(octoai_server, seaweedfs, s3_bucket),
        )
    )
    spec = defs.resolve_assets_def("posters").specs_by_key[AssetKey("posters")]
    # Partitioned: the asset's prefix; each materialization adds its partition.
    assert spec.metadata["dagster/uri"] == f"s3://{s3_bucket}/facts/posters/"
    plain = defs.resolve_assets_def("sketches").specs_by_key[AssetKey("sketches")]
    result = materialize([sketches], resources=_resources(octoai_server, seaweedfs, s3_bucket))
    assert plain.metadata["dagster/uri"] == _metadata(result, "sketches")["dagster/uri"]
    # A bucket from an EnvVar is only known at run time: nothing is claimed.
    unknown = with_image_uris(
        Definitions(
            assets=[sketches],
            resources={
                "octoai": OctoAIResource(),
                "images": S3ImageIOManager(bucket=EnvVar("IMAGES_BUCKET")),
            },
        )
    )
    spec = unknown.resolve_assets_def("sketches").specs_by_key[AssetKey("sketches")]
    assert "dagster/uri" not in spec.metadata


def test_code_references_point_at_the_users_definition() -> None:
    spec = posters.specs_by_key[AssetKey("posters")]
    (reference,) = spec.metadata["dagster/code_references"].code_references
    assert reference.file_path == __file__
    assert reference.line_number == LINE_OF_POSTERS
