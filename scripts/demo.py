"""`make demo`: the example project end to end on this machine, no account, no internet.

Starts the local OctoAI-compatible server and SeaweedFS, materializes every example
asset (every product partition, the async batch through its sensor, the contact sheet)
in a throwaway Dagster instance, checks that the images are in S3 with their metadata
and that the contact sheet is a valid PNG, prints the S3 URIs, and stops what it
started. Then real diffusion: it writes tiny random-weight models
(``dagster-octoai tiny-models``), serves them with the diffusers backend and
materializes one asset through it into the same S3 (the images are noise: random
weights; the code path is the one real SDXL / SD 1.5 weights take). Exits 0 only when
all of that worked.

Usage: python scripts/demo.py [--output-dir .demo] [--s3-endpoint-url URL --bucket NAME]
                              [--no-diffusers | --tiny-models DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _services import (
    BUCKET,
    PREFIX,
    REPO,
    Services,
    StopRequested,
    fail,
    progress,
    running_services,
)

#: How long the async batch may take to be submitted, completed and persisted.
ASYNC_DEADLINE_S = 120.0
#: Object metadata every stored image must carry (S3 user metadata keys).
REQUIRED_IMAGE_METADATA = ("seed", "engine", "asset-key", "partition", "request-fingerprint")


def _throwaway_dagster_home(root: Path) -> Path:
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


#: Dagster's console logger at WARNING: the demo prints its own progress lines.
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _run_job(defs: Any, instance: Any, name: str, **kwargs: Any) -> Any:
    result = defs.resolve_job_def(name).execute_in_process(
        instance=instance, run_config=QUIET_RUN_CONFIG, **kwargs
    )
    if not result.success:
        raise RuntimeError(f"job {name} {kwargs} failed; see the log above")
    return result


def _materialize_products(defs: Any, instance: Any) -> None:
    job = defs.resolve_job_def("product_images_job")
    for product in job.partitions_def.get_partition_keys():
        progress(
            f"product {product}: catalogue, SDXL shot, img2img, ControlNet, inpainting, "
            "poster (YAML)"
        )
        result = _run_job(defs, instance, "product_images_job", partition_key=product)
        for event in result.get_asset_materialization_events():
            mat = event.materialization
            seeds = mat.metadata.get("seeds")
            shown = f" seeds {seeds.value}" if seeds is not None else ""
            progress(f"  materialized {mat.asset_key.to_user_string()}[{product}]{shown}")
        failed = [e for e in result.get_asset_check_evaluations() if not e.passed and e.check_name]
        if failed:
            names = ", ".join(f"{e.asset_key.to_user_string()}:{e.check_name}" for e in failed)
            raise RuntimeError(f"asset checks failed for {product}: {names}")


def _run_async_batch(defs: Any, instance: Any) -> int:
    """Submit the async batch, then tick its sensor and run what it asks until all persisted."""
    from dagster import SensorResult, build_resources, build_sensor_context

    from example_project.async_batch import lifestyle_shots_sensor
    from example_project.definitions import build_resources as example_resources, settings

    progress("async batch: submitting lifestyle_jobs")
    _run_job(defs, instance, "lifestyle_submit_job")
    resources = example_resources(settings)
    # build_resources resolves the EnvVar credentials, as a run would.
    with build_resources({"octoai_ledger": resources["octoai_ledger"]}) as built:
        ledger = built.octoai_ledger.get_ledger()
    cursor: str | None = None
    persisted = 0
    deadline = time.monotonic() + ASYNC_DEADLINE_S
    tick = 0
    while True:
        tick += 1
        with build_sensor_context(
            instance=instance, cursor=cursor, resources=resources, definitions=defs
        ) as context:
            result = lifestyle_shots_sensor(context)
        if not isinstance(result, SensorResult):
            raise RuntimeError(f"the sensor returned {type(result).__name__}, not a SensorResult")
        cursor = result.cursor
        for partitions in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(
                partitions.partitions_def_name, list(partitions.partition_keys)
            )
        run_requests = result.run_requests or []
        progress(
            f"  sensor tick {tick}: {len(run_requests)} run(s) requested, "
            f"{len(ledger.list_open())} job(s) open"
        )
        for request in run_requests:
            _run_job(
                defs,
                instance,
                "lifestyle_persist_job",
                partition_key=request.partition_key,
                tags=request.tags,
            )
            persisted += 1
            progress(f"  persisted async job {request.partition_key}")
        if not ledger.list_open() and not run_requests:
            return persisted
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"async batch: {len(ledger.list_open())} job(s) still open after "
                f"{ASYNC_DEADLINE_S:.0f}s"
            )
        time.sleep(0.5)


def _verify_s3(services: Services, contact_sheet: Path) -> list[str]:
    """Every image has its metadata, every output a manifest; the sheet is a PNG. The URIs."""
    import boto3
    from PIL import Image

    s3 = boto3.client(
        "s3",
        endpoint_url=services.s3_endpoint_url,
        aws_access_key_id=services.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=services.env["AWS_SECRET_ACCESS_KEY"],
        region_name=services.env["AWS_REGION"],
    )
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=services.bucket, Prefix=f"{PREFIX}/"
    ):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    # Images sit under each output's _objects/; the contact sheet beside its manifest.
    images = [
        k
        for k in keys
        if k.endswith((".jpg", ".jpeg", ".png")) and ("/_objects/" in k or "/_" not in k)
    ]
    manifests = [k for k in keys if k.endswith("/manifest.json")]
    image_assets = {k.split("/")[1] for k in images}
    wanted_assets = {
        "product_images",
        "product_watercolor",
        "product_controlnet",
        "product_inpainted",
        "product_poster",
        "lifestyle_shots",
        "contact_sheet",
    }
    if not wanted_assets <= image_assets:
        raise RuntimeError(f"S3 lacks images of {sorted(wanted_assets - image_assets)}")
    for key in images:
        if key.endswith("contact_sheet.png"):
            continue
        head = s3.head_object(Bucket=services.bucket, Key=key)
        missing = [m for m in REQUIRED_IMAGE_METADATA if m not in head["Metadata"]]
        if missing:
            raise RuntimeError(f"s3://{services.bucket}/{key} lacks metadata {missing}")
        if not head["ContentType"].startswith("image/"):
            raise RuntimeError(
                f"s3://{services.bucket}/{key} has content type {head['ContentType']}"
            )
    for key in manifests:
        manifest = json.loads(s3.get_object(Bucket=services.bucket, Key=key)["Body"].read())
        if manifest.get("schema_version") != 2:
            raise RuntimeError(f"s3://{services.bucket}/{key} is not a version 2 manifest")
    with Image.open(io.BytesIO(contact_sheet.read_bytes())) as sheet:
        sheet.verify()
        if sheet.format != "PNG":
            raise RuntimeError(f"{contact_sheet} is {sheet.format}, not a PNG")
    progress(f"verified {len(images)} images (with metadata) and {len(manifests)} manifests in S3")
    return [f"s3://{services.bucket}/{k}" for k in sorted(images)]


def _materialize_through_diffusers(
    services: Services, instance: Any, output_dir: Path, models: Path | None = None
) -> list[str]:
    """Tiny random-weight models, the diffusers backend, SD 1.5 and FLUX assets into S3: the S3 URIs.

    ``models``: where the models are (the test suite passes the ones it wrote for its
    run); by default ``output_dir/tiny-models``. Written there first when missing.
    """
    import secrets
    import subprocess

    import boto3
    from dagster import materialize

    from dagster_octoai.assets import octoai_image_asset
    from dagster_octoai.io_managers import S3ImageIOManager
    from dagster_octoai.resources import OctoAIResource
    from dagster_octoai.server import LocalOctoAIServer, ServerConfig

    if models is not None:
        progress(f"diffusers: the tiny random-weight models in {models}")
    else:
        models = output_dir / "tiny-models"
    if not (models / "dagster-octoai-models.json").is_file():
        progress(f"diffusers: writing tiny random-weight models to {models}")
        subprocess.run(
            [sys.executable, "-m", "dagster_octoai.server.cli", "tiny-models", str(models)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    token = secrets.token_urlsafe(24)
    progress("diffusers: starting a server with the diffusers backend on the tiny models")
    config = ServerConfig(token=token, backend="diffusers", models=str(models))
    with LocalOctoAIServer(config, mode="process") as server:  # the diffusers start-up wait (900 s)
        progress(f"diffusers: server at {server.url}; generating (the images are noise)")
        shots = octoai_image_asset(
            "diffusers_product_shots",
            {
                "engine": "sd",
                "prompt": "a product shot of a (red:1.2) sneaker, studio light",
                "negative_prompt": "blurry",
                "seed": 42,
                "num_images": 2,
                "steps": 8,
                "sampler": "DPM_PLUS_PLUS_2M_KARRAS",
                "loras": {"tiny-crayon": 0.6},
            },
            description="SD 1.5 on tiny random weights: noise, through the real diffusers path.",
        )
        flux = octoai_image_asset(
            "diffusers_flux_shot",
            {
                "engine": "flux-schnell",
                "prompt": "a product shot of a red sneaker, studio light",
                "seed": 42,
                "width": 512,
                "height": 512,
                "loras": {"tiny-flux-ink": 0.6},
            },
            description="FLUX.1 [schnell] (its 4 steps) on tiny random weights: noise.",
        )
        env = services.env
        io_manager = S3ImageIOManager(
            bucket=services.bucket,
            prefix=f"{PREFIX}-diffusers",
            endpoint_url=services.s3_endpoint_url,
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            addressing_style="path",
        )
        result = materialize(
            [shots, flux],
            instance=instance,
            resources={
                "octoai": OctoAIResource(token=token, base_url=server.url, timeout_s=600),
                "io_manager": io_manager,
            },
            run_config=QUIET_RUN_CONFIG,
        )
        if not result.success:
            raise RuntimeError("the diffusers asset failed; see the log above")
        paid = server.stats()["paid_generations"]
    s3 = boto3.client(
        "s3",
        endpoint_url=services.s3_endpoint_url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )
    listing = s3.list_objects_v2(Bucket=services.bucket, Prefix=f"{PREFIX}-diffusers/")
    images = sorted(o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".jpg"))
    if len(images) != 3 or paid != 3 or not any("/diffusers_flux_shot/" in k for k in images):
        raise RuntimeError(
            "diffusers: expected 3 images in S3 (2 SD 1.5, 1 FLUX.1 [schnell]) and 3 "
            f"generated, got {images}, {paid}"
        )
    for key in images:
        head = s3.head_object(Bucket=services.bucket, Key=key)
        # An unpartitioned asset: every key but the partition.
        wanted = [m for m in REQUIRED_IMAGE_METADATA if m != "partition"]
        missing = [m for m in wanted if m not in head["Metadata"]]
        if missing:
            raise RuntimeError(f"s3://{services.bucket}/{key} lacks metadata {missing}")
    progress(f"diffusers: verified {len(images)} images (with metadata) in S3")
    return [f"s3://{services.bucket}/{k}" for k in images]


def main(argv: list[str] | None = None) -> int:
    from dagster import BetaWarning, PreviewWarning

    # The demo prints its own progress; Dagster's notes on its beta APIs are noise here.
    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=REPO / ".demo",
        help="where the contact sheet is written (default: .demo)",
    )
    parser.add_argument(
        "--s3-endpoint-url",
        help="use this S3 (and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) instead of "
        "starting SeaweedFS; the bucket must exist",
    )
    parser.add_argument("--bucket", default=BUCKET, help=f"the bucket (default {BUCKET})")
    parser.add_argument(
        "--no-diffusers",
        action="store_true",
        help="only the quick placeholder run (skip the diffusers backend on tiny models)",
    )
    parser.add_argument(
        "--tiny-models",
        type=Path,
        metavar="DIR",
        help="the tiny models' directory (written there first if it holds none; "
        "default: OUTPUT_DIR/tiny-models)",
    )
    args = parser.parse_args(argv)
    output_dir: Path = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    contact_sheet = output_dir / "contact_sheet.png"
    contact_sheet.unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(prefix="dagster-octoai-demo-") as tmp:
        os.environ["DAGSTER_HOME"] = str(_throwaway_dagster_home(Path(tmp)))
        try:
            with running_services(output_dir, args.s3_endpoint_url, args.bucket) as services:
                services.apply()
                from dagster import DagsterInstance

                progress("loading example_project.definitions")
                from example_project.definitions import defs

                with DagsterInstance.get() as instance:
                    _materialize_products(defs, instance)
                    jobs = _run_async_batch(defs, instance)
                    progress(f"async batch: {jobs} job(s) persisted")
                    progress("contact sheet")
                    _run_job(defs, instance, "contact_sheet_job")
                    uris = _verify_s3(services, contact_sheet)
                    diffused = (
                        []
                        if args.no_diffusers
                        else _materialize_through_diffusers(
                            services, instance, output_dir, args.tiny_models
                        )
                    )
        except (KeyboardInterrupt, StopRequested):
            return fail("interrupted; everything started was stopped")
        except Exception as exc:
            return fail(f"{type(exc).__name__}: {exc}")

    print("\nImages in S3 (a SeaweedFS the demo started is stopped now; re-run to look again):")
    for uri in uris:
        print(f"  {uri}")
    print(f"\nContact sheet: {contact_sheet}")
    if diffused:
        print("\nThrough the diffusers backend (tiny random weights, so the pictures are noise):")
        for uri in diffused:
            print(f"  {uri}")
    progress("demo finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
