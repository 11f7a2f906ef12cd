"""The submit and blocking async assets, over HTTP against the local server, real runs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _support import TOKEN, module_instance, module_server, s3_images
from dagster import (
    DagsterInstance,
    InputContext,
    IOManager,
    OutputContext,
    materialize,
)
from PIL import Image

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.api.errors import RequestValidationError
from dagster_octoai.api.models import JobStatus
from dagster_octoai.async_assets import (
    octoai_async_blocking_asset,
    octoai_async_results_asset,
    octoai_async_submit_asset,
)
from dagster_octoai.io_managers import LocalImageIOManager
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.server import FaultConfig, LocalOctoAIServer, ServerConfig
from dagster_octoai.storage import StorageError
from dagster_octoai.storage.ledger import JobLedger, JobState
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["module_instance", "module_server", "s3_bucket", "seaweedfs"]  # fixtures used here


@pytest.fixture
def server(module_server: LocalOctoAIServer) -> Iterator[LocalOctoAIServer]:
    module_server.configure(faults=FaultConfig(), async_queue_delay_s=0.0)
    module_server.reset_stats()
    yield module_server
    module_server.configure(faults=FaultConfig(), async_queue_delay_s=0.0)


def _resources(server: LocalOctoAIServer, tmp: Path, io_manager: Any = None) -> dict[str, Any]:
    return {
        "octoai": OctoAIResource(token=TOKEN, base_url=server.url, max_attempts=2),
        "octoai_ledger": JobLedgerResource(base_dir=str(tmp / "ledger"), fsync=False),
        "io_manager": io_manager or LocalImageIOManager(base_dir=str(tmp / "images"), prefix="i"),
    }


def _ledger(tmp: Path) -> JobLedger:
    return JobLedgerResource(base_dir=str(tmp / "ledger")).get_ledger()


def _submitted(server: LocalOctoAIServer) -> int:
    count: int = server.stats()["async_jobs"]["submitted"]
    return count


REQUESTS = [
    {"prompt": f"a heron {i}", "engine": "sd", "seed": 40 + i, "steps": 5} for i in range(2)
]


def test_the_submit_asset_refuses_a_body_over_10_mb_before_sending_anything(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    noise = Image.frombytes("RGB", (2048, 1536), os.urandom(2048 * 1536 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG", compress_level=0)
    big = {"prompt": "a heron", "engine": "sd", "init_image": buf.getvalue(), "strength": 0.5}
    results = octoai_async_results_asset("herons")
    submit = octoai_async_submit_asset("heron_jobs", [REQUESTS[0], big], results_asset=results)
    with pytest.raises(RequestValidationError, match=r"requests\[1\]: .* over the 10 MB limit"):
        materialize([submit], instance=instance, resources=_resources(server, tmp_path))
    # Refused before anything was sent or recorded: not even the small first request.
    assert _submitted(server) == 0
    assert list(_ledger(tmp_path).iter_records()) == []


def test_a_second_run_of_the_submit_asset_does_not_pay_again(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    results = octoai_async_results_asset("herons")
    submit = octoai_async_submit_asset("heron_jobs", REQUESTS, results_asset=results)
    resources = _resources(server, tmp_path)
    first = materialize([submit], instance=instance, resources=resources)
    meta = first.asset_materializations_for_node("heron_jobs")[0].metadata
    assert meta["submitted"].value == 2 and meta["resumed"].value == 0  # type: ignore[attr-defined]
    records = list(_ledger(tmp_path).iter_records())
    assert {r.state for r in records} == {JobState.SUBMITTED}
    assert {r.asset_key for r in records} == {"herons"}
    assert sorted(r.request["seed"] for r in records) == [40, 41]

    again = materialize([submit], instance=instance, resources=resources)
    meta = again.asset_materializations_for_node("heron_jobs")[0].metadata
    assert meta["submitted"].value == 0 and meta["resumed"].value == 2  # type: ignore[attr-defined]
    assert _submitted(server) == 2


class _FailingIOManager(IOManager):
    """Fails to store, like a run that dies after the images were fetched."""

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        raise OSError("the disk went away")

    def load_input(self, context: InputContext) -> Any:
        raise NotImplementedError


def test_the_blocking_asset_waits_persists_and_a_retried_run_resumes_its_jobs(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    server.configure(async_queue_delay_s=0.3)
    herons = octoai_async_blocking_asset("blocking_herons", REQUESTS)
    failed = materialize(
        [herons],
        instance=instance,
        resources=_resources(server, tmp_path, _FailingIOManager()),
        raise_on_error=False,
    )
    assert not failed.success
    assert _submitted(server) == 2
    ledger = _ledger(tmp_path)
    assert {r.state for r in ledger.iter_records()} == {JobState.COMPLETED}

    # The retry finds both jobs in the ledger and fetches them: nothing is paid twice.
    ok = materialize([herons], instance=instance, resources=_resources(server, tmp_path))
    assert ok.success
    assert _submitted(server) == 2
    assert server.stats()["paid_generations"] == 2
    meta = ok.asset_materializations_for_node("blocking_herons")[0].metadata
    assert meta["resumed"].value == 2 and meta["completed"].value == 2  # type: ignore[attr-defined]
    response_ids = sorted(r.response_id or "" for r in ledger.iter_records())
    assert sorted(meta["response_ids"].value) == response_ids  # type: ignore[attr-defined]
    assert {r.state for r in ledger.iter_records()} == {JobState.PERSISTED}
    assert ledger.list_open() == []

    manifest = json.loads((tmp_path / "images/i/blocking_herons/manifest.json").read_text())
    stored = sorted(
        im["metadata"]["response-id"] for r in manifest["results"] for im in r["images"]
    )
    assert stored == response_ids


def test_the_blocking_asset_resubmits_a_failed_job_then_fails_with_it_recorded(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    server.configure(faults={"job_failure": 1.0, "job_failure_after_s": 0.1})
    herons = octoai_async_blocking_asset("failing_herons", REQUESTS[:1], max_resubmits=1)
    result = materialize(
        [herons], instance=instance, resources=_resources(server, tmp_path), raise_on_error=False
    )
    assert not result.success
    (record,) = _ledger(tmp_path).iter_records()
    assert record.state is JobState.FAILED
    assert record.attempts == 2 and len(record.previous_response_ids) == 1
    assert "gave up after 2 submission(s)" in (record.error or "")
    assert _submitted(server) == 2


# ---- storage checked before anything is paid for ----------------------------------------


def test_the_blocking_asset_checks_a_missing_bucket_before_submitting(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    # Random seeds: no reuse lookup could have found the bucket missing on the way.
    random_seed = [{"prompt": "a heron", "engine": "sd", "steps": 5}]
    herons = octoai_async_blocking_asset("unstored_herons", random_seed)
    io = s3_images(seaweedfs, "no-such-bucket")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        materialize([herons], instance=instance, resources=_resources(server, tmp_path, io))
    assert _submitted(server) == 0
    assert server.stats()["paid_generations"] == 0
    assert list(_ledger(tmp_path).iter_records()) == []


def test_the_submit_asset_checks_the_results_assets_store_before_submitting(
    instance: DagsterInstance,
    server: LocalOctoAIServer,
    tmp_path: Path,
    seaweedfs: SeaweedFS,
    s3_bucket: str,
) -> None:
    results = octoai_async_results_asset("s3_herons", io_manager_key="images")
    submit = octoai_async_submit_asset("s3_heron_jobs", REQUESTS, results_asset=results)
    resources = {
        **_resources(server, tmp_path),
        "images": s3_images(seaweedfs, s3_bucket, aws_secret_access_key="not-the-secret"),
    }
    with pytest.raises(StorageError, match="S3 refused the credentials") as info:
        materialize([submit], instance=instance, resources=resources)
    assert "IO manager 'images'" in str(info.value)
    assert "not-the-secret" not in str(info.value)
    assert _submitted(server) == 0
    assert list(_ledger(tmp_path).iter_records()) == []


_TERMINATED_RUN = """
import sys
from dagster import DagsterInstance, materialize
from dagster._core.instance.ref import InstanceRef
from dagster_octoai.async_assets import octoai_async_blocking_asset
from dagster_octoai.io_managers import LocalImageIOManager
from dagster_octoai.resources import JobLedgerResource, OctoAIResource

url, token, tmp, home = sys.argv[1:5]
herons = octoai_async_blocking_asset(
    "terminated_herons",
    [{"prompt": f"a slow heron {i}", "engine": "sd", "seed": 70 + i} for i in range(2)],
)
materialize(
    [herons],
    instance=DagsterInstance.from_ref(InstanceRef.from_dir(home)),
    resources={
        "octoai": OctoAIResource(token=token, base_url=url, max_attempts=2),
        "octoai_ledger": JobLedgerResource(base_dir=tmp + "/ledger", fsync=False),
        "io_manager": LocalImageIOManager(base_dir=tmp + "/images", prefix="i"),
    },
)
"""


def test_a_terminated_run_cancels_the_jobs_it_waits_on(
    server: LocalOctoAIServer, instance: DagsterInstance, tmp_path: Path
) -> None:
    # One replica and 30 s an image: one job runs, the other waits, when the run's process
    # is interrupted as Dagster terminates a run (SIGINT to the step's process).
    server.configure(latency_per_image_s=30.0, replicas=1)
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _TERMINATED_RUN,
                server.url,
                TOKEN,
                str(tmp_path),
                str(instance.root_directory),
            ],
        )
        try:
            ledger = _ledger(tmp_path)
            deadline = time.monotonic() + 120
            while (
                len([r for r in ledger.iter_records() if r.response_id is not None]) < 2
                or server.stats()["async_jobs"].get("running", 0) < 1
            ):
                assert proc.poll() is None, "the run ended before its jobs were submitted"
                assert time.monotonic() < deadline, "the run never submitted its jobs"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) != 0
        finally:
            if proc.poll() is None:
                proc.kill()
        records = list(ledger.iter_records())
        assert len(records) == 2
        assert {r.state for r in records} == {JobState.CANCELLED}
        assert all("terminated" in (r.error or "") for r in records)
        with OctoAIClient(TOKEN, base_url=server.url) as client:
            for record in records:
                assert client.poll(record.async_job()).status is JobStatus.CANCELLED
        assert server.stats()["paid_generations"] == 0  # the running one stopped unpaid
    finally:
        server.configure(latency_per_image_s=ServerConfig().latency_per_image_s, replicas=1)
