"""P4: generate and persist 1,000 images of about 1.4 MB in one run, in bounded memory.

A child process (the run's process, so its peak RSS is the run's alone) materializes
one asset with Dagster's in-process executor: the asset returns a lazy
:class:`~dagster_octoai.api.batch.ImageBatch` fed by the run's pooled client
(``OctoAIResource.client.iter_generate``, 4 in flight), and ``S3ImageIOManager``
stores each image in SeaweedFS as it arrives (8 uploads in flight). The package has no
factory for a lazy many-request asset, so the asset is written here in ten lines, as a
user would. The child reports ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end; the
parent checks that the manifest lists every image.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from typing import Any

from ._common import Row, Settings, octoai_server, seaweedfs

LIMIT_MB = 400.0


def _run_child(config: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "P4_CONFIG": json.dumps(config)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._p4_child"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"P4 child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(settings: Settings) -> list[Row]:
    count = settings.n(1000, 3)
    reps = 1
    outcomes: list[dict[str, Any]] = []
    with octoai_server(detail=1.0, replicas=4) as server, seaweedfs() as s3:
        bucket = "bench-" + secrets.token_hex(4)
        s3.client().create_bucket(Bucket=bucket)
        for _ in range(reps):
            outcomes.append(
                _run_child(
                    {
                        "count": count,
                        "server_url": server.url,
                        "bucket": bucket,
                        "endpoint_url": s3.endpoint_url,
                        "region": s3.region,
                        "access_key": s3.access_key,
                        "secret_key": s3.secret_key,
                    }
                )
            )
        paid = server.stats()["paid_generations"]
    all_stored = all(o["success"] and o["image_count"] == count for o in outcomes)
    return [
        Row(
            id="P4",
            scenario=(
                f"generate and persist {count} SDXL images of ~1.4 MB in one run: lazy "
                f"ImageBatch from iter_generate (4 in flight) into S3ImageIOManager, x {reps} runs"
            ),
            baseline="-",
            figure="peak RSS of the run's process",
            unit="MB",
            samples=[o["peak_rss_mb"] for o in outcomes],
            target=LIMIT_MB,
            details={
                "rss_after_imports_mb": [round(o["rss_before_run_mb"], 1) for o in outcomes],
                "images_stored": [o["image_count"] for o in outcomes],
                "server_paid_generations": paid,
            },
            checks={f"every run stored all {count} images": all_stored},
        )
    ]
