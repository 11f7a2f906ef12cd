"""Materialize an async asset in this process and SIGKILL it at a chosen point.

Run by test_restarts.py in a child forked from the suite's fork server
(:func:`run_case`). ``crash_at="<point>:<n>"`` kills the process the n-th time it
reaches ``point``; without it the run goes to the end. Points:
``after_submit`` (the service accepted a job, the ledger does not know its id yet),
``mid_poll`` (a poll was answered), ``mid_fetch`` (a result was downloaded, nothing
stored), ``mid_upload`` (some images are in S3, no manifest) and ``before_manifest``
(every image is in S3, the manifest is not committed).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import dagster as dg

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.async_assets import octoai_async_blocking_asset
from dagster_octoai.io_managers import S3ImageIOManager
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.storage import S3Backend

from ._children import NOT_REACHED, kill_at, redirect_output, write_result
from ._support import s3_connection

REQUESTS = [
    {
        "engine": "sd",
        "prompt": f"a tide pool, plate {i}",
        "steps": 1,
        "num_images": 2,
        "seed": [2 * i, 2 * i + 1],
    }
    for i in range(4)
]


def _install(crash_at: str) -> None:
    point, _, n = crash_at.partition(":")
    nth = int(n or 1)

    def is_image(self: Any, key: str, *a: Any, **k: Any) -> bool:
        return not key.endswith("manifest.json")

    def is_manifest(self: Any, key: str, *a: Any, **k: Any) -> bool:
        return key.endswith("manifest.json")

    hooks: dict[str, tuple[Any, str, dict[str, Any]]] = {
        "after_submit": (OctoAIClient, "submit", {"nth": nth}),
        "mid_poll": (OctoAIClient, "_poll", {"nth": nth}),
        "mid_fetch": (OctoAIClient, "_fetch_url", {"nth": nth}),
        "mid_upload": (S3Backend, "put", {"nth": nth, "when": is_image}),
        # The manifest is the commit point, written with a conditional PUT.
        "before_manifest": (S3Backend, "put_if", {"before": True, "when": is_manifest}),
    }
    owner, name, options = hooks[point]
    kill_at(owner, name, **options)


def run_case(env: dict[str, str], crash_at: str | None, log_path: str, result_path: str) -> None:
    """In a forked child: set the environment, maybe arm a crash point, materialize."""
    redirect_output(log_path)
    os.environ.update(env)
    if crash_at:
        _install(crash_at)
    sys.exit(_materialize(os.environ, result_path, crash_at))


def _materialize(env: Mapping[str, str], result_path: str, crash_at: str | None) -> int:
    asset = octoai_async_blocking_asset(
        "tide_pools", REQUESTS, io_manager_key="images", max_concurrency=1, wait_timeout_s=60
    )
    resources = {
        "octoai": OctoAIResource(
            token=dg.EnvVar("OCTOAI_TOKEN"), base_url=env["OCTOAI_URL"], initial_backoff_s=0.01
        ),
        "octoai_ledger": JobLedgerResource(base_dir=env["LEDGER_DIR"]),
        "images": S3ImageIOManager(
            bucket=env["S3_BUCKET"],
            **s3_connection(env["S3_ENDPOINT"], env["S3_KEY"], env["S3_SECRET"]),
            max_concurrency=1,
        ),
    }
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([asset], resources=resources, instance=instance)
        [event] = result.get_asset_materialization_events()
        meta = {k: v.value for k, v in event.materialization.metadata.items()}
    write_result(result_path, {"resumed": meta["resumed"], "jobs": meta["jobs"]})
    return NOT_REACHED if crash_at else 0
