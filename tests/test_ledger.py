"""The job ledger on a local directory and on a real S3 (SeaweedFS)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from dagster_octoai.api.models import AsyncJob, ImageGenerationRequest
from dagster_octoai.resources import JobLedgerResource
from dagster_octoai.storage.backends import LocalBackend, S3Backend
from dagster_octoai.storage.ledger import (
    JobLedger,
    JobRecord,
    JobState,
    job_id_for,
)
from dagster_octoai.testing import seaweedfs as _seaweedfs
from dagster_octoai.testing.seaweedfs import SeaweedFS

# The S3 fixtures, until the package's pytest plugin registers them.
seaweedfs = _seaweedfs.seaweedfs
s3_bucket = _seaweedfs.s3_bucket


class Clock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _request(prompt: str = "a red fox", seed: int = 7) -> ImageGenerationRequest:
    return ImageGenerationRequest(prompt=prompt, seed=seed, engine="sd", steps=10)


def _job(request: ImageGenerationRequest, response_id: str) -> AsyncJob:
    return AsyncJob(
        response_id=response_id,
        poll_url=f"http://127.0.0.1:9/v1/requests/{response_id}",
        request=request,
    )


@pytest.fixture(params=["local", "s3"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobLedger]:
    if request.param == "local":
        yield JobLedger(LocalBackend(tmp_path / "ledger", fsync=True), clock=Clock())
    else:
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        bucket: str = request.getfixturevalue("s3_bucket")
        yield JobLedger(S3Backend(server.client(), bucket), "ledger/jobs", clock=Clock())


def test_a_job_goes_from_intent_to_persisted_with_its_marker_in_step(ledger: JobLedger) -> None:
    req = _request()
    rec = JobRecord.new(req, asset_key="images", partition_key="p1", job_id="job1", run_id="r1")
    intent = ledger.record_intent(rec)
    assert intent.state is JobState.INTENT and intent.attempts == 1
    assert ledger.list_open() == [intent.open_marker]

    submitted = ledger.record_submitted(intent, _job(req, "resp-1"))
    assert ledger.get("job1") == submitted
    assert submitted.state is JobState.SUBMITTED
    assert submitted.poll_url == "http://127.0.0.1:9/v1/requests/resp-1"
    found = ledger.find_by_response_id("resp-1")
    assert found is not None and found.job_id == "job1"

    completed = ledger.save(submitted.evolve(state=JobState.COMPLETED))
    assert ledger.list_open() == [intent.open_marker]
    ledger.save(completed.evolve(state=JobState.PERSISTED))
    assert ledger.list_open() == []
    final = ledger.get("job1")
    assert final is not None and final.state is JobState.PERSISTED
    assert [r.job_id for r in ledger.iter_records()] == ["job1"]


def test_resubmission_keeps_the_request_and_remembers_earlier_response_ids(
    ledger: JobLedger,
) -> None:
    req = _request(seed=123)
    rec = ledger.record_intent(JobRecord.new(req, asset_key="a", partition_key=None, job_id="j"))
    first = ledger.record_submitted(rec, _job(req, "old"))
    again = ledger.record_submitted(ledger.record_intent(first), _job(req, "new"))
    assert again.attempts == 2
    assert again.previous_response_ids == ["old"]
    assert again.request_model() == req
    assert again.request_model().seed == 123
    # Both response ids lead to the job (the fetch asset may be asked for either).
    assert ledger.find_by_response_id("old") == again
    assert ledger.find_by_response_id("new") == again
    assert ledger.find_by_response_id("never") is None


def test_open_markers_sort_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    ledger = JobLedger(LocalBackend(tmp_path), clock=clock)
    for name in ["zz", "aa", "mm"]:
        ledger.record_intent(
            JobRecord.new(_request(name), asset_key="a", partition_key=None, job_id=name)
        )
        clock.advance(1)
    assert [ledger.job_id_of_marker(m) for m in ledger.list_open()] == ["zz", "aa", "mm"]


def test_the_record_holds_the_full_request_and_nothing_secret(tmp_path: Path) -> None:
    init = Image.new("RGB", (64, 64), "red")
    req = ImageGenerationRequest(prompt="a fox", engine="sd", init_image=init, strength=0.5)
    ledger = JobLedger(LocalBackend(tmp_path, fsync=True))
    ledger.record_intent(JobRecord.new(req, asset_key="a", partition_key="p", job_id="j"))
    data = json.loads((tmp_path / "jobs" / "j.json").read_text())
    assert data["request"] == req.to_wire()
    assert data["engine"] == "sd"
    assert data["asset_key"] == "a" and data["partition_key"] == "p"
    assert "token" not in json.dumps(data).lower()
    stored = ledger.get("j")
    assert stored is not None and stored.request_model() == req


def test_a_failed_write_leaves_the_old_record_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = JobLedger(LocalBackend(tmp_path, fsync=True))
    rec = ledger.record_intent(
        JobRecord.new(_request(), asset_key="a", partition_key=None, job_id="j")
    )

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ledger.save(rec.evolve(state=JobState.PENDING))
    monkeypatch.undo()
    assert ledger.get("j") == rec
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["j.json"]


def test_a_stale_marker_of_a_final_record_is_listed_until_discarded(tmp_path: Path) -> None:
    ledger = JobLedger(LocalBackend(tmp_path))
    rec = ledger.record_intent(
        JobRecord.new(_request(), asset_key="a", partition_key=None, job_id="j")
    )
    ledger.save(rec.evolve(state=JobState.PERSISTED))
    # A crash between the record write and the marker delete leaves the marker behind.
    # (The local backend removed the emptied open/ folder with the marker.)
    (tmp_path / "open").mkdir(exist_ok=True)
    (tmp_path / "open" / rec.open_marker).write_bytes(b"")
    assert ledger.list_open() == [rec.open_marker]
    ledger.discard_marker(rec.open_marker)
    assert ledger.list_open() == []


def test_response_ids_cannot_escape_the_ledger(tmp_path: Path) -> None:
    ledger = JobLedger(LocalBackend(tmp_path / "ledger"))
    req = _request()
    rec = ledger.record_intent(JobRecord.new(req, asset_key="a", partition_key=None, job_id="j"))
    ledger.record_submitted(rec, _job(req, "../../outside"))
    assert not (tmp_path / "outside").exists()
    assert {p.parent.name for p in (tmp_path / "ledger").rglob("*") if p.is_file()} == {
        "jobs",
        "open",
        "responses",
    }
    found = ledger.find_by_response_id("../../outside")
    assert found is not None and found.job_id == "j"


def test_job_ids_are_deterministic_per_asset_partition_request_and_scope() -> None:
    req = _request()
    base = job_id_for("a", "p", req)
    assert base == job_id_for("a", "p", _request())
    assert len({base, job_id_for("b", "p", req), job_id_for("a", None, req)}) == 3
    assert job_id_for("a", "p", req, occurrence=1) != base
    assert job_id_for("a", "p", req, scope="run-1") != job_id_for("a", "p", req, scope="run-2")


def test_the_resource_needs_exactly_one_place(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of base_dir"):
        JobLedgerResource().get_ledger()
    with pytest.raises(ValueError, match="got both"):
        JobLedgerResource(base_dir=str(tmp_path), bucket="b").get_ledger()


def test_the_resource_opens_an_s3_ledger(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    res = JobLedgerResource(
        bucket=s3_bucket,
        prefix="runs/ledger",
        endpoint_url=seaweedfs.endpoint_url,
        region_name=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
    )
    ledger = res.get_ledger()
    ledger.record_intent(JobRecord.new(_request(), asset_key="a", partition_key=None, job_id="j"))
    keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(k.split("/")[2] for k in keys) == ["jobs", "open"]
    assert all(k.startswith("runs/ledger/") for k in keys)
    assert ledger.uri("j") == f"s3://{s3_bucket}/runs/ledger/jobs/j.json"


def test_every_s3_failure_of_the_ledger_is_a_storage_error_naming_the_object(
    seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    from dagster_octoai.api.errors import StorageError

    req = _request()
    record = JobRecord.new(req, asset_key="a", partition_key=None, job_id="j")
    refused = JobLedgerResource(
        bucket=s3_bucket,
        prefix="refused",
        endpoint_url=seaweedfs.endpoint_url,
        region_name=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key="not-the-secret",
        addressing_style="path",
    ).get_ledger()
    where = f"s3://{s3_bucket}/refused/jobs/j.json"
    with pytest.raises(StorageError, match=f"credentials .*{where}"):
        refused.get("j")
    with pytest.raises(StorageError, match=f"{where}|refused/open/"):
        refused.record_intent(record)
    missing = JobLedger(S3Backend(seaweedfs.client(), "no-such-bucket-here"), "p")
    with pytest.raises(
        StorageError, match=r"no-such-bucket-here.*s3://no-such-bucket-here/p/jobs/j\.json"
    ):
        missing.get("j")
