"""Shared helpers of the reliability suite: the token, S3 inventories, server tallies.

Forked children import it too (through ``_sensor_support`` and ``_crash_driver``), so
what only annotations need is imported for type checkers alone.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from dagster_octoai.io_managers import S3ImageIOManager

if TYPE_CHECKING:
    from dagster_octoai.server import LocalOctoAIServer
    from dagster_octoai.testing.seaweedfs import SeaweedFS

#: A recognisable token: any trace of it in logs, errors, events or objects is a leak.
LEAK_TOKEN = "sk-LEAKCHECK-9f3b2c7d41e8a6b5c0d9"

#: Faults that fail a request (a slow answer is late, not failed).
FAILING_FAULTS = ("rate_limited", "error_500", "error_503", "drop_connection", "drop_after_render")

_IMAGE_NAME = re.compile(r"^(?P<index>\d{3,})-seed(?P<seed>\d+)\.(?:jpg|png|webp|gif|bin)$")


class Figures:
    """Numbers each scenario measured, by scenario name, for docs/reliability.md."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def record(self, scenario: str, **numbers: Any) -> None:
        self.rows.setdefault(scenario, {}).update(numbers)


def s3_connection(
    endpoint_url: str, access_key: str, secret_key: str, region: str = "us-east-1"
) -> dict[str, Any]:
    """The IO manager's S3 connection fields for a SeaweedFS known by its address and keys."""
    return {
        "endpoint_url": endpoint_url,
        "region_name": region,
        "aws_access_key_id": access_key,
        "aws_secret_access_key": secret_key,
        "addressing_style": "path",
    }


def s3_io(
    server: SeaweedFS, bucket: str, prefix: str = "octoai", **overrides: Any
) -> S3ImageIOManager:
    """The S3 image IO manager on the suite's SeaweedFS."""
    settings: dict[str, Any] = {
        "bucket": bucket,
        "prefix": prefix,
        **s3_connection(server.endpoint_url, server.access_key, server.secret_key, server.region),
        "max_concurrency": 8,
    }
    settings.update(overrides)
    return S3ImageIOManager(**settings)


@dataclass
class Inventory:
    """What is in a bucket under a prefix: image objects and manifests."""

    images: dict[str, str] = field(default_factory=dict)  # key -> ETag
    sizes: dict[str, int] = field(default_factory=dict)  # every listed key -> bytes
    manifests: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    orphans_removed: int = 0

    @property
    def duplicate_contents(self) -> int:
        """Image objects whose bytes another image object already holds."""
        return len(self.images) - len(set(self.images.values()))

    def seeds(self) -> Counter[int]:
        out: Counter[int] = Counter()
        for key in self.images:
            match = _IMAGE_NAME.match(key.rsplit("/", 1)[-1])
            assert match is not None, key
            out[int(match["seed"])] += 1
        return out


def inventory(client: Any, bucket: str, prefix: str) -> Inventory:
    """List every object under ``prefix``, sorted into images, manifests and the rest."""
    inv = Inventory()
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = str(obj["Key"])
            inv.sizes[key] = int(obj["Size"])
            name = key.rsplit("/", 1)[-1]
            if "/_index/" in f"/{key}" or "/_staging/" in f"/{key}":
                inv.other.append(key)
            elif name == "manifest.json":
                inv.manifests.append(key)
            elif _IMAGE_NAME.match(name):
                inv.images[key] = str(obj["ETag"])
            else:
                inv.other.append(key)
    return inv


def manifest_problems(client: Any, bucket: str, inv: Inventory) -> list[str]:
    """Images a manifest lists that are missing (or differ in size) in the listing."""
    problems: list[str] = []
    for key in inv.manifests:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        for result in manifest["results"]:
            for image in result["images"]:
                if not image["key"]:
                    continue
                size = inv.sizes.get(image["key"])
                if size is None:
                    problems.append(f"{key} lists missing {image['key']}")
                elif size != image["bytes"]:
                    problems.append(
                        f"{key} lists {image['key']} with {image['bytes']} bytes, not {size}"
                    )
    return problems


def stored_once(client: Any, bucket: str, images: int, manifests: int) -> Inventory:
    """The bucket's inventory, checked: seeds ``0..images-1`` once each, manifests complete.

    What killed or failed writes left (objects under ``_objects/`` that no committed
    manifest lists) is removed first by the store's clean-up, judged as of three days on,
    as an operator's nightly run would; ``orphans_removed`` says how many there were.
    """
    from dagster_octoai.storage import ImageStore, S3Backend

    later = datetime.now(timezone.utc) + timedelta(days=3)
    cleaned = ImageStore(S3Backend(client, bucket)).clean_up(now=later)
    inv = inventory(client, bucket, "")
    inv.orphans_removed = len(cleaned.removed_keys)
    seeds = inv.seeds()
    assert len(inv.images) == images and sorted(seeds) == list(range(images))
    assert inv.duplicate_contents == 0 and max(seeds.values()) == 1
    assert len(inv.manifests) == manifests and manifest_problems(client, bucket, inv) == []
    return inv


@dataclass
class ServerTally:
    """Server counts summed over several stats windows (the request log holds 1,000 lines)."""

    paid: int = 0
    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    paid_lost: int = 0  # images rendered for sync answers the fault then dropped
    lost_submits: int = 0  # async submissions accepted (and run) whose answer was dropped
    lost_response_ids: list[str] = field(default_factory=list)  # the jobs of those submissions
    seeds_rendered: Counter[int] = field(default_factory=Counter)

    def take(self, server: LocalOctoAIServer) -> None:
        """Add the server's counts since the last take, then reset them."""
        stats = server.stats()
        log = server.requests(limit=1000)
        assert len(log) == stats["requests_total"] and len(log) < 1000, (
            "the request log overflowed: take() more often"
        )
        self.paid += stats["paid_generations"]
        self.requests += stats["requests_total"]
        self.faults.update(stats["faults"])
        for rec in log:
            if rec["fault"] == "drop_after_render" and rec["route"] == "/generate/{engine}":
                self.paid_lost += rec["images"]
                if rec["response_id"] is not None:
                    self.lost_submits += 1
                    self.lost_response_ids.append(rec["response_id"])
            self.seeds_rendered.update(rec["seeds"])
        server.reset_stats()

    @property
    def retried_failures(self) -> int:
        return sum(self.faults[f] for f in FAILING_FAULTS)


def failed_jobs(server: LocalOctoAIServer, response_ids: list[str]) -> int:
    """How many of these async jobs failed on the server (asked with faults turned off)."""
    import httpx

    failed = 0
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        for response_id in response_ids:
            answer = client.get(f"/v1/requests/{response_id}")
            answer.raise_for_status()
            failed += answer.json()["status"] == "failed"
    return failed
