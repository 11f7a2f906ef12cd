"""Materialize an async asset in this process and SIGKILL it at a chosen point.

Run by test_restarts.py as a subprocess. ``CRASH_AT=<point>:<n>`` kills the process
the n-th time it reaches ``point``; without it the run goes to the end. Points:
``after_submit`` (the service accepted a job, the ledger does not know its id yet),
``mid_poll`` (a poll was answered), ``mid_fetch`` (a result was downloaded, nothing
stored), ``mid_upload`` (some images are in S3, no manifest) and ``before_manifest``
(every image is in S3, the manifest is not).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import dagster as dg

from dagster_octoai.async_assets import octoai_async_blocking_asset
from dagster_octoai.client import OctoAIClient
from dagster_octoai.io_managers import S3ImageIOManager
from dagster_octoai.jobs_ledger import JobLedgerResource
from dagster_octoai.resources import OctoAIResource
from dagster_octoai.storage import S3Backend

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


def _crash_after(owner: Any, name: str, point: str, nth: int, when: Callable[..., bool]) -> None:
    original = getattr(owner, name)
    seen = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        if point == "before_manifest" and when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def _install(crash_at: str) -> None:
    point, _, n = crash_at.partition(":")
    nth = int(n or 1)
    always: Callable[..., bool] = lambda *a, **k: True  # noqa: E731
    is_image: Callable[..., bool] = lambda self, key, *a, **k: not key.endswith("manifest.json")  # noqa: E731
    is_manifest: Callable[..., bool] = lambda self, key, *a, **k: key.endswith("manifest.json")  # noqa: E731
    hooks = {
        "after_submit": (OctoAIClient, "submit", always),
        "mid_poll": (OctoAIClient, "_poll", always),
        "mid_fetch": (OctoAIClient, "_fetch_url", always),
        "mid_upload": (S3Backend, "put", is_image),
        "before_manifest": (S3Backend, "put", is_manifest),
    }
    owner, name, when = hooks[point]
    _crash_after(owner, name, point, nth, when)


def main() -> int:
    crash_at = os.environ.get("CRASH_AT")
    if crash_at:
        _install(crash_at)
    env = os.environ
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
            endpoint_url=env["S3_ENDPOINT"],
            region_name="us-east-1",
            aws_access_key_id=env["S3_KEY"],
            aws_secret_access_key=env["S3_SECRET"],
            addressing_style="path",
            max_concurrency=1,
        ),
    }
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([asset], resources=resources, instance=instance)
        [event] = result.get_asset_materialization_events()
        meta = {k: v.value for k, v in event.materialization.metadata.items()}
    print(json.dumps({"resumed": meta["resumed"], "jobs": meta["jobs"]}))
    return 3 if crash_at else 0  # a crash point that was never reached is a test failure


if __name__ == "__main__":
    sys.exit(main())
