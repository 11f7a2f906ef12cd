"""A 1,000-image batch (400 in `make test`) through 20 % transient faults: every image persisted once, paid once.

Two variants, each 4 partitions x 25 requests x 10 images (4 in `make test`) of SD 1.5 at 512x512 (its
smallest size) from an instant server:

- partitioned sync: a user's partitioned asset generating through ``OctoAIResource``
  into the ``S3ImageIOManager``;
- async: ``octoai_async_blocking_asset`` (submit, poll, fetch through the job ledger)
  with faults on polls and fetches too, and some async jobs failing on the server.

One in five generate calls meets a fault (429 with Retry-After, 500, 503, a dropped
connection before or after the images were rendered, a slow answer), drawn from a
fixed seed. The client retries with small backoffs so the batch takes seconds.
"""

# No `from __future__ import annotations`: Dagster reads the context annotation at definition time.

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from dagster_octoai.api.batch import ImageBatch
from dagster_octoai.async_assets import octoai_async_blocking_asset
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.server import FaultConfig, LocalOctoAIServer, ServerConfig
from dagster_octoai.storage.ledger import JobState
from dagster_octoai.testing.seaweedfs import SeaweedFS
from devtools.secrets import TokenScanner

from ._support import (
    LEAK_TOKEN,
    Figures,
    ServerTally,
    inventory,
    manifest_problems,
    s3_io,
)
from .conftest import FIGURES_ENV

PARTITIONS = 4
REQUESTS_PER_PARTITION = 25
# 1,000 images for the figures of docs/reliability.md (`make reliability`); 400 in
# `make test`: as many requests, so as many faults of every kind, with fewer images each.
IMAGES_PER_REQUEST = 10 if os.environ.get(FIGURES_ENV) else 4
TOTAL = PARTITIONS * REQUESTS_PER_PARTITION * IMAGES_PER_REQUEST

# 20 % of generate calls fail or are late; the rest are answered at once.
FAULTS = FaultConfig(
    rate_limited=0.04,
    error_500=0.04,
    error_503=0.04,
    drop_connection=0.03,
    drop_after_render=0.02,
    slow=0.03,
    slow_s=0.3,
    retry_after_s=1,
    seed=20240901,
)

PARTS = dg.StaticPartitionsDefinition([f"part-{i:02d}" for i in range(PARTITIONS)])


def _requests_of(partition_key: str) -> list[dict[str, Any]]:
    p = int(partition_key.rsplit("-", 1)[1])
    out = []
    for r in range(REQUESTS_PER_PARTITION):
        first = (p * REQUESTS_PER_PARTITION + r) * IMAGES_PER_REQUEST
        out.append(
            {
                "engine": "sd",
                "prompt": f"a lighthouse, study {p}-{r}",
                "steps": 1,
                "num_images": IMAGES_PER_REQUEST,
                "seed": list(range(first, first + IMAGES_PER_REQUEST)),
            }
        )
    return out


def _resource(server: LocalOctoAIServer) -> OctoAIResource:
    return OctoAIResource(
        token=dg.EnvVar("OCTOAI_TOKEN"),
        base_url=server.url,
        timeout_s=10.0,
        max_attempts=10,
        initial_backoff_s=0.02,
        max_backoff_s=0.2,
        max_retry_after_s=5.0,
        deadline_s=120.0,
        max_concurrency=8,
    )


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCTOAI_TOKEN", LEAK_TOKEN)


def _materialize_each_partition(
    asset: dg.AssetsDefinition,
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    server: LocalOctoAIServer,
    tally: ServerTally,
) -> None:
    """One run per partition, the server's counts taken after each (its log holds every image)."""
    for key in PARTS.get_partition_keys():
        result = dg.materialize([asset], resources=resources, partition_key=key, instance=instance)
        assert result.success, key
        tally.take(server)


def _check_store(seaweedfs: SeaweedFS, bucket: str) -> tuple[int, int]:
    """Every image persisted once, under one manifest per partition: (persisted, duplicates)."""
    client = seaweedfs.client()
    inv = inventory(client, bucket, "octoai/")
    duplicates = inv.duplicate_contents + sum(n - 1 for n in inv.seeds().values())
    problems = manifest_problems(client, bucket, inv)
    assert (len(inv.images), duplicates, len(inv.manifests), problems) == (TOTAL, 0, PARTITIONS, [])
    return len(inv.images), duplicates


def _scan_for_leaks(
    scanner: TokenScanner, instance: dg.DagsterInstance, seaweedfs: SeaweedFS, bucket: str
) -> int:
    """No token in the instance's events or the bucket's objects: how many leaks were found."""
    leaks, events = scanner.scan_instance(instance)
    assert events > 0 and leaks == []
    s3_leaks, objects = scanner.scan_s3(seaweedfs.client(), bucket)
    assert objects > TOTAL and s3_leaks == []
    return len(leaks) + len(s3_leaks)


def _record(
    figures: Figures, scenario: str, persisted: int, duplicates: int, leaks: int, **numbers: int
) -> None:
    """A scenario's figures: the columns both scenarios report, then ``numbers``."""
    figures.record(
        scenario,
        images_requested=TOTAL,
        images_persisted=persisted,
        duplicates_in_s3=duplicates,
        leaks_found=leaks,
        **numbers,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_partitioned_sync_batch_through_faults_persists_every_image_once(
    seaweedfs: SeaweedFS,
    bucket: str,
    token_env: None,
    figures: Figures,
    scanner: TokenScanner,
) -> None:
    @dg.asset(partitions_def=PARTS, io_manager_key="images")
    def lighthouses(context: dg.AssetExecutionContext, octoai: OctoAIResource) -> ImageBatch:
        requests = _requests_of(context.partition_key)
        with octoai.get_client(context) as session:
            answers = dict(session.iter_generate(requests))
        return ImageBatch([answers[i] for i in range(len(requests))])

    instance = dg.DagsterInstance.ephemeral()
    tally = ServerTally()
    with LocalOctoAIServer(ServerConfig(token=LEAK_TOKEN, replicas=8, faults=FAULTS)) as server:
        resources = {"octoai": _resource(server), "images": s3_io(seaweedfs, bucket)}
        _materialize_each_partition(lighthouses, resources, instance, server, tally)

    persisted, duplicates = _check_store(seaweedfs, bucket)
    # The faults happened, and each failing kind at least once.
    assert tally.retried_failures >= 0.1 * tally.requests
    assert all(tally.faults[f] > 0 for f in ("rate_limited", "error_500", "error_503"))
    assert tally.faults["drop_connection"] > 0 and tally.faults["drop_after_render"] > 0
    # Paid exactly once per image: an answer rendered and then lost on the wire is asked
    # for again under the client's Idempotency-Key and served from the first render.
    assert tally.paid_lost > 0 and tally.paid == TOTAL
    # Only a lost answer's seeds come back a second time: in its repeat, served unpaid.
    answered_twice = sum(n - 1 for n in tally.seeds_rendered.values())
    assert answered_twice == tally.paid_lost

    leaks = _scan_for_leaks(scanner, instance, seaweedfs, bucket)

    _record(
        figures,
        "1,000-image batch, partitioned sync, 20 % faults",
        persisted,
        duplicates,
        leaks,
        paid_generations=tally.paid,
        retried_failures=tally.retried_failures,
        paid_for_lost_answers=tally.paid - TOTAL,
        http_requests=tally.requests,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_async_batch_through_faults_persists_every_image_once(
    seaweedfs: SeaweedFS,
    bucket: str,
    token_env: None,
    tmp_path: Path,
    figures: Figures,
    scanner: TokenScanner,
) -> None:
    images = octoai_async_blocking_asset(
        "async_lighthouses",
        lambda context: _requests_of(context.partition_key),
        partitions_def=PARTS,
        io_manager_key="images",
        wait_timeout_s=120.0,
        max_resubmits=3,
        max_concurrency=REQUESTS_PER_PARTITION,
    )
    faults = FAULTS.model_copy(
        update={"on_async_routes": True, "job_failure": 0.05, "job_failure_after_s": 0.05}
    )
    ledger = JobLedgerResource(base_dir=str(tmp_path / "ledger"), fsync=False)
    instance = dg.DagsterInstance.ephemeral()
    tally = ServerTally()
    with LocalOctoAIServer(ServerConfig(token=LEAK_TOKEN, replicas=8, faults=faults)) as server:
        resources = {
            "octoai": _resource(server),
            "octoai_ledger": ledger,
            "images": s3_io(seaweedfs, bucket),
        }
        _materialize_each_partition(images, resources, instance, server, tally)
        server.configure(faults=FaultConfig())

    persisted, duplicates = _check_store(seaweedfs, bucket)
    records = list(ledger.get_ledger().iter_records())
    assert len(records) == PARTITIONS * REQUESTS_PER_PARTITION
    assert {r.state for r in records} == {JobState.PERSISTED}
    resubmitted = sum(r.attempts - 1 for r in records)
    # The ledger's Idempotency-Key makes the retry of a submission whose answer was lost
    # the job that submission made: the client sees every job (failed ones too), and no
    # job whose acceptance was lost runs, and is paid for, beside its retry.
    seen_failures = tally.faults["job_failure"]
    assert seen_failures > 0 and resubmitted >= seen_failures
    assert tally.faults["drop_connection"] > 0
    lost_paid = tally.paid - TOTAL
    assert lost_paid == 0

    leaks = _scan_for_leaks(scanner, instance, seaweedfs, bucket)
    assert scanner.scan_files(tmp_path / "ledger") == []
    ledger_text = json.dumps([r.model_dump(mode="json") for r in records])
    assert scanner.scan_text(ledger_text, "ledger records") == []

    _record(
        figures,
        "1,000-image batch, async jobs, 20 % faults (also on polls and fetches)",
        persisted,
        duplicates,
        leaks,
        paid_generations=tally.paid,
        retried_failures=tally.retried_failures + resubmitted,
        paid_for_lost_answers=lost_paid,
        http_requests=tally.requests,
    )
