"""The example project: its definitions load, its jobs run end to end against the local
OctoAI-compatible server and SeaweedFS (in process and under the multiprocess executor),
and ``scripts/demo.py`` (what ``make demo`` runs) succeeds."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _support import example_project_env
from dagster import (
    AssetKey,
    DagsterInstance,
    Definitions,
    SensorResult,
    build_resources,
    build_sensor_context,
    execute_job,
    instance_for_test,
    reconstructable,
)
from PIL import Image

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs
from example_project.catalogue import PRODUCTS
from example_project.definitions import build_definitions, resolved_product_images_job
from example_project.settings import ExampleSettings

__all__ = ["s3_bucket", "seaweedfs"]  # fixtures used by name

REPO = Path(__file__).resolve().parent.parent
PREFIX = "dagster-octoai"
# product_poster is the one defined in YAML (defs/product_poster/defs.yaml, a Component).
PRODUCT_ASSETS = (
    "product_images",
    "product_watercolor",
    "product_controlnet",
    "product_inpainted",
    "product_poster",
)
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@pytest.fixture
def example_env(
    octoai_server_factory: Any,
    seaweedfs: SeaweedFS,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[LocalOctoAIServer, dict[str, str]]]:
    """A server of this test's own (exact counts) and the env the example project reads."""
    server: LocalOctoAIServer = octoai_server_factory(token="example-token")
    env = {
        **example_project_env(server, seaweedfs, s3_bucket, tmp_path / "output"),
        "EXAMPLE_S3_PREFIX": PREFIX,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield server, env


def _keys(seaweedfs: SeaweedFS, bucket: str) -> list[str]:
    listing = seaweedfs.client().list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def _image_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if k.endswith(".jpg")]


def test_definitions_load_with_local_defaults() -> None:
    settings = ExampleSettings.from_env({})
    assert settings.octoai_base_url == "http://127.0.0.1:8000"
    assert not settings.uses_s3
    defs = build_definitions(settings)
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {
        "prompt_catalogue",
        *PRODUCT_ASSETS,
        "contact_sheet",
        "lifestyle_jobs",
        "lifestyle_shots",
    }
    checks = {c.to_user_string() for c in graph.asset_check_keys}
    for asset in PRODUCT_ASSETS:
        assert f"{asset}:images_decode" in checks
    assert defs.get_schedule_def("daily_product_images").cron_schedule == "0 6 * * *"
    assert defs.get_sensor_def("lifestyle_shots_sensor") is not None
    job = defs.resolve_job_def("product_images_job")
    assert job.partitions_def is not None
    assert list(job.partitions_def.get_partition_keys()) == list(PRODUCTS)


def test_s3_settings_come_from_the_environment() -> None:
    settings = ExampleSettings.from_env(
        {"EXAMPLE_S3_ENDPOINT_URL": "http://127.0.0.1:9000", "OCTOAI_BASE_URL": "http://x:1"}
    )
    assert settings.uses_s3
    assert settings.s3_bucket == "octoai-example"
    assert settings.octoai_base_url == "http://x:1"


def _persist_async_batch(defs: Definitions, instance: DagsterInstance) -> int:
    """Tick the sensor and run what it requests until the ledger has no open job."""
    sensor = defs.get_sensor_def("lifestyle_shots_sensor")
    resources = defs.resources or {}
    with build_resources({"octoai_ledger": resources["octoai_ledger"]}) as built:
        ledger = built.octoai_ledger.get_ledger()
    cursor: str | None = None
    persisted = 0
    for _ in range(20):
        with build_sensor_context(
            instance=instance, cursor=cursor, resources=resources, definitions=defs
        ) as context:
            result = sensor(context)
        assert isinstance(result, SensorResult)
        cursor = result.cursor
        for partitions in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(
                partitions.partitions_def_name, list(partitions.partition_keys)
            )
        for request in result.run_requests or []:
            run = defs.resolve_job_def("lifestyle_persist_job").execute_in_process(
                instance=instance,
                partition_key=request.partition_key,
                tags=request.tags,
                run_config=QUIET,
            )
            assert run.success
            persisted += 1
        if not ledger.list_open() and not result.run_requests:
            return persisted
    raise AssertionError(f"async jobs still open after 20 ticks: {ledger.list_open()}")


def test_example_runs_end_to_end(
    example_env: tuple[LocalOctoAIServer, dict[str, str]], seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    server, env = example_env
    defs = build_definitions(ExampleSettings.from_env(env))
    job = defs.resolve_job_def("product_images_job")
    with instance_for_test() as instance:
        for product in PRODUCTS:
            result = job.execute_in_process(
                instance=instance, partition_key=product, run_config=QUIET
            )
            assert result.success
            assert all(e.passed for e in result.get_asset_check_evaluations())
        assert server.stats()["paid_generations"] == len(PRODUCT_ASSETS) * len(PRODUCTS)

        submit = defs.resolve_job_def("lifestyle_submit_job").execute_in_process(
            instance=instance, run_config=QUIET
        )
        assert submit.success
        assert _persist_async_batch(defs, instance) == len(PRODUCTS)

        sheet = defs.resolve_job_def("contact_sheet_job").execute_in_process(
            instance=instance, run_config=QUIET
        )
        assert sheet.success

        # Restartable per product: re-running one partition pays for nothing (explicit seeds).
        paid = server.stats()["paid_generations"]
        again = job.execute_in_process(
            instance=instance, partition_key="desk-lamp", run_config=QUIET
        )
        assert again.success
        assert server.stats()["paid_generations"] == paid

    keys = _keys(seaweedfs, s3_bucket)
    images = _image_keys(keys)
    for asset in PRODUCT_ASSETS:
        for product in PRODUCTS:
            base = f"{PREFIX}/{asset}/partition={product}/_objects/"
            assert any(k.startswith(base) and "/000-seed" in k for k in images), (
                asset,
                product,
            )
    assert len([k for k in images if k.startswith(f"{PREFIX}/lifestyle_shots/")]) == len(PRODUCTS)

    s3 = seaweedfs.client()
    key = next(k for k in images if k.startswith(f"{PREFIX}/product_images/partition=ceramic-mug/"))
    head = s3.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentType"] == "image/jpeg"
    assert head["Metadata"]["seed"] == "1001"
    assert head["Metadata"]["engine"] == "sdxl"
    assert head["Metadata"]["partition"] == "ceramic-mug"
    manifest = json.loads(
        s3.get_object(
            Bucket=s3_bucket, Key=f"{PREFIX}/product_images/partition=ceramic-mug/manifest.json"
        )["Body"].read()
    )
    assert manifest["partition"] == "ceramic-mug"

    sheet_path = Path(env["EXAMPLE_OUTPUT_DIR"]) / "contact_sheet.png"
    stored = s3.get_object(Bucket=s3_bucket, Key=f"{PREFIX}/contact_sheet/contact_sheet.png")
    assert stored["ContentType"] == "image/png"
    assert stored["Body"].read() == sheet_path.read_bytes()
    with Image.open(sheet_path) as im:
        assert im.format == "PNG"
        assert im.width > 4 * 200 and im.height > len(PRODUCTS) * 200

    # The token was handed to the resource; no object, manifest or metadata carries it.
    for k in keys:
        obj = s3.get_object(Bucket=s3_bucket, Key=k)
        assert env["OCTOAI_TOKEN"].encode() not in obj["Body"].read()
        assert env["OCTOAI_TOKEN"] not in json.dumps(obj["Metadata"])


@pytest.mark.slow
def test_example_job_runs_under_the_multiprocess_executor(
    example_env: tuple[LocalOctoAIServer, dict[str, str]],
    seaweedfs: SeaweedFS,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    server, _ = example_env
    # Three of the job's five steps, each a process of its own (a Python that imports
    # Dagster and the project: the cost of the test): the catalogue, the shot that reads
    # it, and a variation that reads both, so both of the project's hand-overs between
    # steps cross processes through S3. The other two variations read the same inputs the
    # same way; test_example_runs_end_to_end runs all five.
    selected = ("prompt_catalogue", "product_images", "product_watercolor")
    with instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = execute_job(
            reconstructable(resolved_product_images_job),
            instance=instance,
            tags={"dagster/partition": "trail-sneaker"},
            run_config=QUIET,
            asset_selection=[AssetKey(name) for name in selected],
        )
        assert result.success
        step_pids = {e.pid for e in result.all_events if e.is_step_success and e.pid is not None}
    # Each step ran in a process of its own, none in this one.
    assert len(step_pids) == len(selected)
    assert os.getpid() not in step_pids
    assert server.stats()["paid_generations"] == 2
    images = _image_keys(_keys(seaweedfs, s3_bucket))
    assert sorted(k.split("/")[1] for k in images) == ["product_images", "product_watercolor"]
    assert all("/partition=trail-sneaker/" in k for k in images)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_script_succeeds(
    seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path, tiny_models: Path
) -> None:
    """What `make demo` runs, pointed at the suite's SeaweedFS so the objects can be checked.

    It serves the run's tiny models (tests/conftest.py) rather than writing its own: the
    command that writes them is tested there and in tests/diffusion.
    """
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "AWS_REGION": seaweedfs.region,
    }
    out = tmp_path / "demo"
    demo = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "demo.py"),
            "--output-dir",
            str(out),
            "--s3-endpoint-url",
            seaweedfs.endpoint_url,
            "--bucket",
            s3_bucket,
            "--tiny-models",
            str(tiny_models),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    images = _image_keys(_keys(seaweedfs, s3_bucket))
    # The product assets per product, plus one async lifestyle shot per product.
    assert len(images) == (len(PRODUCT_ASSETS) + 1) * len(PRODUCTS), (images, demo.stdout[-3000:])
    for key in images:
        assert f"s3://{s3_bucket}/{key}" in demo.stdout, (key, demo.stdout[-3000:])
    head = seaweedfs.client().head_object(Bucket=s3_bucket, Key=images[0])
    assert {"seed", "engine", "request-fingerprint"} <= set(head["Metadata"])
    # The quickstart's sample output counts what this demo counts.
    verified = r"verified (\d+) images \(with metadata\) and (\d+) manifests in S3"
    printed = re.search(verified, demo.stdout + demo.stderr)
    documented = re.search(verified, (REPO / "docs" / "quickstart.md").read_text())
    assert printed is not None and documented is not None
    assert documented.groups() == printed.groups(), (documented.groups(), printed.groups())
    png = (out / "contact_sheet.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as im:
        im.verify()
    assert "demo finished" in demo.stdout
    # The diffusers step: two SD 1.5 images and a FLUX.1 [schnell] one.
    assert demo.stdout.count(f"s3://{s3_bucket}/{PREFIX}-diffusers/") == 3, demo.stdout[-3000:]
    assert f"{PREFIX}-diffusers/diffusers_flux_shot/" in demo.stdout
