"""The README's quickstart runs as written, against the local server and SeaweedFS."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import dagster as dg

from dagster_octoai import OctoAIResource, S3ImageIOManager
from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.seaweedfs import SeaweedFS

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_quickstart_materializes_a_partition(
    octoai_server: LocalOctoAIServer, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    block, _ = _python_blocks()
    namespace: dict[str, Any] = {}
    exec(compile(block, str(README), "exec"), namespace)
    defs: dg.Definitions = namespace["defs"]
    assert defs.resolve_assets_def("product_images").partitions_def is not None
    asset = namespace["product_images"]

    before = octoai_server.stats()["paid_generations"]
    result = dg.materialize(
        [asset],
        partition_key="blue-kettle",
        resources={
            "octoai": OctoAIResource(token=octoai_server.token, base_url=octoai_server.url),
            "images": S3ImageIOManager(
                bucket=s3_bucket,
                prefix="generated",
                endpoint_url=seaweedfs.endpoint_url,
                aws_access_key_id=seaweedfs.access_key,
                aws_secret_access_key=seaweedfs.secret_key,
            ),
        },
    )
    assert result.success
    assert octoai_server.stats()["paid_generations"] == before + 1
    mat = result.asset_materializations_for_node("product_images")[0]
    uri = mat.metadata["dagster/uri"].value
    assert uri == f"s3://{s3_bucket}/generated/product_images/partition=blue-kettle/"


def test_readme_own_asset_stores_the_answer_it_returns(
    octoai_server: LocalOctoAIServer, seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    _, block = _python_blocks()
    namespace: dict[str, Any] = {}
    # As a user's module runs it: without this file's `from __future__ import annotations`.
    exec(compile(block, str(README), "exec", dont_inherit=True), namespace)
    images = S3ImageIOManager(
        bucket=s3_bucket,
        prefix="generated",
        endpoint_url=seaweedfs.endpoint_url,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
    )
    result = dg.materialize(
        [namespace["fox"]],
        resources={
            "octoai": OctoAIResource(token=octoai_server.token, base_url=octoai_server.url),
            "images": images,
        },
    )
    assert result.success
    manifest = images.store.read_manifest(["fox"], None)
    assert manifest is not None
    (record,) = manifest["results"]
    assert record["request"] == {"engine": "sdxl", "body": {"prompt": "a red fox", "seed": 7}}
    assert [im["seed"] for im in record["images"]] == [7]
