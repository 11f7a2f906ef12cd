"""Races and kills against the commit points: the job ledger and the image manifest.

The figures of docs/reliability.md for what issue 15 fixed: sensor evaluations and runs
racing to (re)submit one job pay once, image writes killed before each step of the commit
protocol leave the committed output whole, and concurrent writers of one output leave one
version. The racers meet at a barrier after their reads, so every race is certain (see
tests/_ledger_races.py and tests/_store_children.py, shared with the unit tests).
"""

from __future__ import annotations

import json
import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from _ledger_races import child_run, evaluate_tick, in_processes, in_threads, ledger_resource
from _store_children import answer, killed_write, mp, picture, racing_write, run_children, store_of

from dagster_octoai.api.models import AsyncJob, ImageGenerationRequest
from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.storage.ledger import JobLedger, JobRecord
from dagster_octoai.testing.seaweedfs import SeaweedFS

from ._support import LEAK_TOKEN, Figures

LATER = datetime.now(timezone.utc) + timedelta(days=3)


def _place(seaweedfs: SeaweedFS, bucket: str) -> dict[str, Any]:
    return {
        "bucket": bucket,
        "endpoint_url": seaweedfs.endpoint_url,
        "region": seaweedfs.region,
        "access_key": seaweedfs.access_key,
        "secret_key": seaweedfs.secret_key,
    }


def _ledger_place(seaweedfs: SeaweedFS, bucket: str) -> dict[str, Any]:
    return {
        "bucket": bucket,
        "prefix": "ledger",
        "endpoint_url": seaweedfs.endpoint_url,
        "region_name": seaweedfs.region,
        "aws_access_key_id": seaweedfs.access_key,
        "aws_secret_access_key": seaweedfs.secret_key,
    }


def test_sensor_evaluations_at_once_resubmit_an_expired_job_once(
    octoai_server: LocalOctoAIServer, seaweedfs: SeaweedFS, bucket: str, figures: Figures
) -> None:
    place = _ledger_place(seaweedfs, bucket)
    shared = ledger_resource(place).get_ledger()
    ledger = JobLedger(shared.backend, shared.prefix)
    req = ImageGenerationRequest(prompt="a harbour at dawn", engine="sd", seed=4242, steps=2)
    intent = ledger.record_intent(
        JobRecord.new(req, asset_key="harbour_images", partition_key=None, job_id="job-harbour")
    )
    ledger.record_submitted(
        intent,
        AsyncJob(
            response_id="expired", poll_url=f"{octoai_server.url}/v1/requests/expired", request=req
        ),
    )
    octoai_server.reset_stats()
    racers = 4
    ticks = in_threads(
        racers, lambda barrier: evaluate_tick(place, octoai_server.url, LEAK_TOKEN, barrier)
    )
    record = ledger.get("job-harbour")
    assert record is not None
    submitted = octoai_server.stats()["async_jobs"]["submitted"]
    raced = sum("lost races 1" in t["skip_reason"] for t in ticks)
    assert submitted == 1 and raced == racers - 1
    assert record.previous_response_ids == ["expired"] and record.attempts == 2
    figures.record(
        "4 sensor evaluations at once resubmit an expired job (S3 ledger)",
        images_requested=1,
        paid_generations=octoai_server.stats()["paid_generations"],
        resubmissions=submitted,
        lost_races_logged=raced,
        response_ids_lost=0,
        leaks_found=0,
    )


def test_runs_of_one_explicit_seed_partition_at_once_pay_once(
    octoai_server: LocalOctoAIServer, tmp_path: Path, figures: Figures
) -> None:
    octoai_server.reset_stats()
    place = {"base_dir": str(tmp_path / "ledger")}
    runs = in_processes(
        3,
        child_run,
        ("blocking", place, octoai_server.url, LEAK_TOKEN, str(tmp_path / "images")),
        tmp_path,
    )
    assert all(r["success"] for r in runs), runs
    paid = octoai_server.stats()["paid_generations"]
    assert paid == 1 and octoai_server.stats()["async_jobs"]["submitted"] == 1
    figures.record(
        "3 runs at once of one explicit-seed async partition (blocking asset)",
        images_requested=1,
        images_persisted=sum(len(r["metadata"]["seeds"]) for r in runs),
        paid_generations=paid,
        runs_that_waited_for_the_winner=sum(r["metadata"]["resumed"] for r in runs),
        leaks_found=0,
    )


def test_an_image_write_killed_before_each_step_leaves_the_output_whole(
    seaweedfs: SeaweedFS, bucket: str, figures: Figures
) -> None:
    place = _place(seaweedfs, bucket)
    store = store_of(place)
    first = [picture(1), picture(2)]

    def write_first() -> None:
        store.write(
            [answer("a fox", [1, 2])], asset_key=["fox"], partition_key="p1", run_id="first"
        )

    write_first()
    killed = whole = removed = 0
    for step in range(1, 15):
        (code,) = run_children(killed_write, [(place, step)])
        if code == 0:
            break
        assert code == -signal.SIGKILL
        killed += 1
        manifest = store.read_manifest(["fox"], "p1")
        assert manifest is not None
        expected = first if manifest["run_id"] == "first" else [*first, picture(53)]
        assert [im.data for im in store.read(["fox"], "p1")] == expected
        whole += 1
        removed += len(store.clean_up(now=LATER).removed_keys)
        if manifest["run_id"] != "first":
            write_first()
    assert killed >= 5 and whole == killed
    figures.record(
        "Image write SIGKILLed before each step of the commit protocol (S3)",
        images_requested=3,
        writes_killed=killed,
        outputs_left_whole=whole,
        orphans_removed_by_clean_up=removed,
        leaks_found=0,
    )


def test_concurrent_writers_of_one_output_leave_one_version(
    seaweedfs: SeaweedFS, bucket: str, tmp_path: Path, figures: Figures
) -> None:
    place = _place(seaweedfs, bucket)
    store = store_of(place)
    store.write([answer("a fox", [1, 2])], asset_key=["fox"], partition_key="p1", run_id="first")
    n = 3
    barrier = mp().Barrier(n)
    outs = [tmp_path / f"w{i}.json" for i in range(n)]
    codes = run_children(racing_write, [(place, i, False, barrier, str(outs[i])) for i in range(n)])
    assert codes == [0] * n
    results = [json.loads(o.read_text()) for o in outs]
    manifest = store.read_manifest(["fox"], "p1")
    assert manifest is not None
    winner = next(r for r in results if r["write_id"] == manifest["write_id"])
    expected = [picture(1 + winner["offset"]), picture(2 + winner["offset"])]
    assert [im.data for im in store.read(["fox"], "p1")] == expected
    keys = {o.key for o in store.backend.list("gen/")}
    listed = {im["key"] for r in manifest["results"] for im in r["images"]}
    left_over = keys - listed - {store.manifest_key(["fox"], "p1")}
    assert left_over == set()
    figures.record(
        "3 concurrent writers of one image output (S3, processes)",
        images_requested=3 * 2,
        images_persisted=len(listed),
        committed_versions=1,
        objects_left_over=len(left_over),
        leaks_found=0,
    )


@pytest.fixture(autouse=True)
def _server_reset(octoai_server: LocalOctoAIServer) -> None:
    octoai_server.configure(async_queue_delay_s=0.0)
