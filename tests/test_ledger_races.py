"""Concurrent sensor ticks and runs of one job pay once: the ledger's compare-and-swap.

Each test makes its racers read the same record, then meet at a barrier, so every one
of them acts on the same stale read (see ``_ledger_races``). Racers run in threads and
in child processes, on a local ledger and on S3 (SeaweedFS, whose conditional writes
answer 412 to the loser as AWS does). The server's own count of submissions is the
figure: an expired job resubmitted once, a partition's job submitted once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _ledger_races import (
    child_run,
    child_tick,
    evaluate_tick,
    in_processes,
    in_threads,
    ledger_resource,
    meet_after_first_read,
    run_partition,
    submit_asset,
)
from _support import TOKEN, module_server

from dagster_octoai.api.models import AsyncJob, ImageGenerationRequest
from dagster_octoai.server import FaultConfig, LocalOctoAIServer
from dagster_octoai.storage.backends import ConflictError, LocalBackend, S3Backend
from dagster_octoai.storage.ledger import (
    JobLedger,
    JobRecord,
    JobState,
)
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs

__all__ = ["module_server", "s3_bucket", "seaweedfs"]  # fixtures used by this module

RACERS = 4


@pytest.fixture
def server(module_server: LocalOctoAIServer) -> Iterator[LocalOctoAIServer]:
    module_server.configure(faults=FaultConfig(), async_queue_delay_s=0.0, result_ttl_s=3600)
    module_server.reset_stats()
    yield module_server


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Where the ledger lives: the fields of its ``JobLedgerResource``."""
    if request.param == "local":
        return {"base_dir": str(tmp_path / "ledger")}
    s3: SeaweedFS = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("s3_bucket")
    return {
        "bucket": bucket,
        "prefix": "races/ledger",
        "endpoint_url": s3.endpoint_url,
        "region_name": s3.region,
        "aws_access_key_id": s3.access_key,
        "aws_secret_access_key": s3.secret_key,
    }


def _ledger(place: dict[str, Any]) -> JobLedger:
    shared = ledger_resource(place).get_ledger()
    return JobLedger(shared.backend, shared.prefix)


def _submitted(server: LocalOctoAIServer) -> int:
    count: int = server.stats()["async_jobs"]["submitted"]
    return count


def _expired_job(ledger: JobLedger, server: LocalOctoAIServer) -> JobRecord:
    """A submitted job whose result the server no longer knows: polls answer 404."""
    req = ImageGenerationRequest(prompt="a harbour at dawn", engine="sd", seed=4242, steps=2)
    intent = ledger.record_intent(
        JobRecord.new(req, asset_key="harbour_images", partition_key=None, job_id="job-harbour")
    )
    return ledger.record_submitted(
        intent,
        AsyncJob(
            response_id="expired-harbour",
            poll_url=f"{server.url}/v1/requests/expired-harbour",
            request=req,
        ),
    )


def _check_resubmitted_once(ledger: JobLedger, server: LocalOctoAIServer) -> JobRecord:
    assert _submitted(server) == 1, "the expired job was resubmitted more than once"
    record = ledger.get("job-harbour")
    assert record is not None
    assert record.attempts == 2
    assert record.previous_response_ids == ["expired-harbour"]
    assert record.response_id not in (None, "expired-harbour")
    # Every response id still leads to the job: none vanished from the ledger.
    for rid in (record.response_id, "expired-harbour"):
        found = ledger.find_by_response_id(rid or "")
        assert found is not None and found.job_id == "job-harbour"
    return record


# ---- two sensor evaluations at once ------------------------------------------------------


def test_sensor_evaluations_in_threads_resubmit_an_expired_job_once(
    server: LocalOctoAIServer, place: dict[str, Any]
) -> None:
    ledger = _ledger(place)
    _expired_job(ledger, server)

    ticks = in_threads(RACERS, lambda barrier: evaluate_tick(place, server.url, TOKEN, barrier))

    _check_resubmitted_once(ledger, server)
    said = [t["skip_reason"] for t in ticks]
    assert sum("resubmitted 1" in s for s in said) == 1, said
    assert sum("lost races 1" in s for s in said) == RACERS - 1, said


def test_sensor_evaluations_in_processes_resubmit_an_expired_job_once(
    server: LocalOctoAIServer, place: dict[str, Any], tmp_path: Path
) -> None:
    ledger = _ledger(place)
    _expired_job(ledger, server)

    ticks = in_processes(3, child_tick, (place, server.url, TOKEN), tmp_path)

    _check_resubmitted_once(ledger, server)
    assert sum("resubmitted 1" in t["skip_reason"] for t in ticks) == 1


def test_evaluations_that_see_a_job_complete_at_once_ask_for_one_persist_run(
    server: LocalOctoAIServer, tmp_path: Path
) -> None:
    place = {"base_dir": str(tmp_path / "ledger")}
    ledger = _ledger(place)
    record = _expired_job(ledger, server)
    # Resubmitted once by a first tick; its job completes at once on this server.
    in_threads(1, lambda barrier: evaluate_tick(place, server.url, TOKEN, barrier))
    rid = (ledger.get(record.job_id) or record).response_id

    ticks = in_threads(RACERS, lambda barrier: evaluate_tick(place, server.url, TOKEN, barrier))

    assert [key for t in ticks for key in t["run_keys"]] == [rid]
    final = ledger.get(record.job_id)
    assert final is not None and final.state is JobState.COMPLETED
    assert _submitted(server) == 1


# ---- two runs of one explicit-seed partition at once ---------------------------------------


def test_submit_runs_of_one_partition_in_threads_submit_once(
    server: LocalOctoAIServer, place: dict[str, Any], tmp_path: Path
) -> None:
    asset = submit_asset()

    def run(_: Any) -> dict[str, Any]:
        return run_partition(asset, place, server.url, TOKEN, str(tmp_path / "images"))

    with meet_after_first_read(threading.Barrier(RACERS), RACERS):
        runs = in_threads(RACERS, run)
    _check_submitted_once(server, place, runs, RACERS)


def test_submit_runs_of_one_partition_in_processes_submit_once(
    server: LocalOctoAIServer, place: dict[str, Any], tmp_path: Path
) -> None:
    runs = in_processes(
        3, child_run, ("submit", place, server.url, TOKEN, str(tmp_path / "images")), tmp_path
    )
    _check_submitted_once(server, place, runs, 3)


def _check_submitted_once(
    server: LocalOctoAIServer, place: dict[str, Any], runs: list[dict[str, Any]], n: int
) -> None:
    assert all(r["success"] for r in runs), runs
    assert _submitted(server) == 1, "one partition's job was submitted more than once"
    assert sum(r["metadata"]["submitted"] for r in runs) == 1
    assert sum(r["metadata"]["raced"] for r in runs) == n - 1
    (record,) = list(_ledger(place).iter_records())
    assert record.attempts == 1 and record.state is JobState.SUBMITTED
    assert {rid for r in runs for rid in r["metadata"]["response_ids"]} == {record.response_id}


def test_blocking_runs_of_one_partition_in_processes_pay_once_and_both_get_the_image(
    server: LocalOctoAIServer, tmp_path: Path
) -> None:
    place = {"base_dir": str(tmp_path / "ledger")}
    runs = in_processes(
        2, child_run, ("blocking", place, server.url, TOKEN, str(tmp_path / "images")), tmp_path
    )
    assert all(r["success"] for r in runs), runs
    assert _submitted(server) == 1
    assert server.stats()["paid_generations"] == 1
    assert [r["metadata"]["seeds"] for r in runs] == [[4242], [4242]]
    assert sorted(r["metadata"]["resumed"] for r in runs) == [0, 1]
    (record,) = list(_ledger(place).iter_records())
    assert record.state is JobState.PERSISTED and record.attempts == 1


# ---- the compare-and-swap itself -------------------------------------------------------------


def test_of_writers_racing_to_create_or_replace_a_record_exactly_one_wins(
    place: dict[str, Any],
) -> None:
    ledger = _ledger(place)
    store, key = ledger.backend, f"{ledger.prefix}/jobs/race.json".lstrip("/")

    def create(i: int) -> str:
        try:
            store.put_if(key, f"create {i}".encode(), "application/json", {}, None)
        except ConflictError:
            return "lost"
        return "won"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(create, range(16)))
    assert outcomes.count("won") == 1
    current = store.get_versioned(key)
    assert current is not None

    def replace(i: int) -> str:
        try:
            store.put_if(key, f"replace {i}".encode(), "application/json", {}, current.version)
        except ConflictError:
            return "lost"
        return "won"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(replace, range(16)))
    assert outcomes.count("won") == 1
    with pytest.raises(ConflictError, match="changed by another writer"):
        store.put_if(key, b"stale", "application/json", {}, current.version)


def test_a_stale_record_is_refused_and_a_response_answered_late_is_never_lost(
    place: dict[str, Any],
) -> None:
    ledger = _ledger(place)
    req = ImageGenerationRequest(prompt="a quay", engine="sd", seed=1, steps=2)
    intent = ledger.record_intent(
        JobRecord.new(req, asset_key="a", partition_key=None, job_id="job-quay")
    )
    # A second writer takes the intent for lost and resubmits before the first answer is in.
    taken = ledger.record_intent(intent.evolve(error="taken for lost"))
    with pytest.raises(ConflictError):
        ledger.save(intent.evolve(state=JobState.FAILED))
    theirs = ledger.record_submitted(taken, AsyncJob(response_id="r-2", poll_url="/x", request=req))
    # The first submission's answer arrives late: kept, not written over the second's.
    late = ledger.record_submitted(intent, AsyncJob(response_id="r-1", poll_url="/y", request=req))
    assert late.response_id == "r-2" == theirs.response_id
    assert late.previous_response_ids == ["r-1"]
    assert ledger.find_by_response_id("r-1") == late


def test_a_corrupt_record_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    ledger = JobLedger(LocalBackend(tmp_path))
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "bad.json").write_text(json.dumps({"job_id": "bad"}))
    from dagster_octoai.storage import StorageError

    with pytest.raises(StorageError, match=r"jobs/bad\.json is not a valid job record"):
        ledger.get("bad")


def test_s3_conditional_writes_are_what_the_s3_ledger_sends(
    seaweedfs: SeaweedFS, s3_bucket: str
) -> None:
    store = S3Backend(seaweedfs.client(), s3_bucket)

    def put(key: str, data: bytes, expected: str | None) -> str:
        return store.put_if(f"cas/{key}", data, "application/json", {}, expected)

    first = put("k.json", b"one", None)
    with pytest.raises(ConflictError, match="created by another writer first"):
        put("k.json", b"two", None)
    with pytest.raises(ConflictError, match="changed by another writer"):
        put("k.json", b"two", '"0123456789abcdef0123456789abcdef"')
    second = put("k.json", b"two", first)
    got = store.get_versioned("cas/k.json")
    assert got is not None and got.data == b"two" and got.version == second
    with pytest.raises(ConflictError, match="removed since it was read"):
        put("gone.json", b"x", first)
