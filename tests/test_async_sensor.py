"""The async sensor against the local OctoAI-compatible server over HTTP, with a real instance.

Each test submits jobs through the submit asset, evaluates sensor ticks with
``evaluate_tick`` on a sqlite ``DagsterInstance`` in a temp dir, applies the
dynamic partitions the tick asks for (the daemon's part), and runs each requested
run with ``materialize`` and the run request's partition and tags, storing images
with the real ``LocalImageIOManager``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from _scripted_server import Reply, ScriptedServer, scripted_server
from _support import TOKEN, module_instance, module_server
from dagster import (
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    RunRequest,
    build_sensor_context,
    materialize,
)
from dagster._core.definitions.sensor_definition import SensorExecutionData

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.api.models import ImageGenerationRequest, JobStatus
from dagster_octoai.async_assets import octoai_async_results_asset, octoai_async_submit_asset
from dagster_octoai.io_managers import LocalImageIOManager
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.sensors import octoai_async_sensor
from dagster_octoai.server import FaultConfig, LocalOctoAIServer
from dagster_octoai.storage.ledger import JobLedger, JobRecord, JobState
from dagster_octoai.storage.ticker import RESPONSE_ID_TAG, AsyncSensorCursor, AsyncSensorSettings

__all__ = ["module_instance", "module_server"]  # fixtures used by this module


def _requests(n: int, prompt: str = "a red fox") -> list[dict[str, Any]]:
    return [
        {"prompt": f"{prompt} {i}", "engine": "sd", "seed": 100 + i, "steps": 5} for i in range(n)
    ]


class Harness:
    """A submit asset, a results asset and the sensor, on one instance and one ledger."""

    def __init__(
        self,
        instance: DagsterInstance,
        server_url: str,
        tmp: Path,
        requests: Sequence[dict[str, Any]] = (),
        **settings: Any,
    ) -> None:
        self.instance = instance
        self.ledger_dir = tmp / "ledger"
        self.images_dir = tmp / "images"
        self.octoai = OctoAIResource(token=TOKEN, base_url=server_url, max_attempts=2)
        self.ledger_resource = JobLedgerResource(base_dir=str(self.ledger_dir), fsync=False)
        self.resources: dict[str, Any] = {
            "octoai": self.octoai,
            "octoai_ledger": self.ledger_resource,
            "io_manager": LocalImageIOManager(base_dir=str(self.images_dir), prefix="img"),
        }
        self.results = octoai_async_results_asset("async_images")
        self.submit = octoai_async_submit_asset(
            "async_jobs", list(requests), results_asset=self.results
        )
        self.sensor = octoai_async_sensor(
            asset=self.results,
            minimum_interval_seconds=1,
            settings=AsyncSensorSettings(**settings),
        )
        self.defs = Definitions(
            assets=[self.submit, self.results], sensors=[self.sensor], resources=self.resources
        )
        self.cursor: str | None = None
        self.runs: list[ExecuteInProcessResult] = []

    @property
    def ledger(self) -> JobLedger:
        shared = self.ledger_resource.get_ledger()
        return JobLedger(shared.backend, shared.prefix)

    def submit_jobs(self) -> ExecuteInProcessResult:
        result = materialize([self.submit], instance=self.instance, resources=self.resources)
        assert result.success
        return result

    def tick(self, cursor: str | None = None, *, use_cursor: bool = True) -> SensorExecutionData:
        """One tick, as the daemon does it: evaluate, add the partitions, keep the cursor."""
        with build_sensor_context(
            instance=self.instance,
            # With the ref, the sensor's partition checks see the instance's dynamic partitions.
            instance_ref=self.instance.get_ref(),
            cursor=cursor if not use_cursor else self.cursor,
            definitions=self.defs,
            resources={"octoai": self.octoai, "octoai_ledger": self.ledger_resource},
        ) as context:
            data = self.sensor.evaluate_tick(context)
        for req in data.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        self.cursor = data.cursor
        return data

    def run(self, request: RunRequest) -> ExecuteInProcessResult:
        result = materialize(
            [self.results],
            instance=self.instance,
            resources=self.resources,
            partition_key=request.partition_key,
            tags=dict(request.tags),
            raise_on_error=False,
        )
        self.runs.append(result)
        return result

    def tick_and_run(self, ticks: int, pause_s: float = 0.2) -> list[RunRequest]:
        """Tick ``ticks`` times, running every requested run once (as the daemon would)."""
        seen: set[str] = set()
        requested: list[RunRequest] = []
        for _ in range(ticks):
            data = self.tick()
            for rr in data.run_requests:
                assert rr.run_key is not None
                if rr.run_key in seen:
                    continue  # the daemon drops a run_key it has launched before
                seen.add(rr.run_key)
                requested.append(rr)
                self.run(rr)
            if self.all_final():
                break
            time.sleep(pause_s)
        return requested

    def all_final(self) -> bool:
        records = list(self.ledger.iter_records())
        return bool(records) and all(r.state.is_final for r in records)

    def stored_outputs(self) -> dict[str, dict[str, Any]]:
        """Partition -> manifest of every stored output of the results asset."""
        root = self.images_dir / "img" / "async_images"
        out = {}
        for manifest in sorted(root.glob("partition=*/manifest.json")):
            out[manifest.parent.name.removeprefix("partition=")] = json.loads(manifest.read_text())
        return out


@pytest.fixture
def server(module_server: LocalOctoAIServer) -> Iterator[LocalOctoAIServer]:
    """The module's server, jobs pending 0.3 s, counts zeroed; restored after the test."""
    module_server.configure(async_queue_delay_s=0.3, result_ttl_s=3600, faults=FaultConfig())
    module_server.reset_stats()
    yield module_server
    module_server.configure(async_queue_delay_s=0.3, result_ttl_s=3600, faults=FaultConfig())


def _paid(server: LocalOctoAIServer) -> int:
    paid: int = server.stats()["paid_generations"]
    return paid


def test_jobs_are_polled_across_ticks_and_persisted_exactly_once(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    # Each job waits DELAY_S on the server once it has been accepted, which is after
    # `started`: a first tick that ends within DELAY_S of `started` polled every job while
    # it was pending, however slow the box. A box so loaded that the submit run and the
    # tick took longer cannot show a pending job to a tick; the rest still holds there.
    delay_s = 4.0
    server.configure(async_queue_delay_s=delay_s)
    h = Harness(instance, server.url, tmp_path, _requests(3))
    started = time.monotonic()
    submitted = h.submit_jobs()
    rids = submitted.asset_materializations_for_node("async_jobs")[0].metadata["response_ids"]
    response_ids = sorted(rids.value)  # type: ignore[attr-defined]
    assert len(response_ids) == 3

    first = h.tick()
    if time.monotonic() - started < delay_s:  # every poll saw its job pending
        assert first.run_requests == []
        assert {r.state for r in h.ledger.iter_records()} == {JobState.PENDING}

    # Ticks until every job is persisted (tick_and_run stops there), however long it takes.
    requested = first.run_requests
    for rr in requested:
        h.run(rr)
    requested += h.tick_and_run(ticks=600)
    assert sorted(rr.partition_key or "" for rr in requested) == response_ids
    assert all(rr.run_key == rr.partition_key for rr in requested)
    assert all(r.success for r in h.runs)

    # Persisted once each, with the response id in the manifest; nothing left open.
    stored = h.stored_outputs()
    assert sorted(stored) == response_ids
    for rid, manifest in stored.items():
        images = [im for r in manifest["results"] for im in r["images"]]
        assert len(images) == 1
        assert images[0]["metadata"]["response-id"] == rid
    assert h.ledger.list_open() == []
    assert {r.state for r in h.ledger.iter_records()} == {JobState.PERSISTED}
    assert _paid(server) == 3

    # Later ticks request nothing more.
    assert h.tick().run_requests == []
    assert (
        instance.get_dynamic_partitions("async_images_jobs") == response_ids
        or sorted(instance.get_dynamic_partitions("async_images_jobs")) == response_ids
    )
    cursor = AsyncSensorCursor.parse(h.cursor)
    assert cursor.completed == 3 and cursor.polls >= 3
    assert len(h.cursor or "") < 1000

    # Materialization metadata carries the response id and the ledger's open count.
    mat = h.runs[0].asset_materializations_for_node("async_images")[0]
    assert mat.metadata["response_id"].value == h.runs[0].dagster_run.tags[RESPONSE_ID_TAG]  # type: ignore[attr-defined]
    assert "ledger_open_jobs" in mat.metadata


def test_a_tick_stops_at_its_time_budget_and_the_next_reaches_the_rest(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    h = Harness(
        instance, server.url, tmp_path, _requests(5), max_concurrent_polls=1, tick_time_budget_s=0.5
    )
    h.submit_jobs()
    # Every poll now takes 0.3 s: one worker reaches only some jobs in a 0.5 s budget.
    server.configure(faults={"slow": 1.0, "slow_s": 0.3, "on_async_routes": True})
    ledger = h.ledger

    def polled() -> set[str]:
        return {r.job_id for r in ledger.iter_records() if r.last_polled_at is not None}

    h.tick()
    first = polled()
    assert 0 < len(first) < 5
    cursor = AsyncSensorCursor.parse(h.cursor)
    assert cursor.position is not None
    h.tick()
    second = polled()
    assert second > first  # the next tick went on with jobs the first did not reach
    for _ in range(3):
        if len(polled()) == 5:
            break
        h.tick()
    assert len(polled()) == 5  # every job reached within a few ticks


def test_a_sensor_restarted_from_an_old_or_lost_cursor_loses_and_repeats_nothing(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    h = Harness(instance, server.url, tmp_path, _requests(2))
    h.submit_jobs()
    old_cursor = h.tick().cursor
    time.sleep(0.5)
    # Completed, runs requested; then the sensor "crashes" before any run ran.
    data = h.tick()
    assert len(data.run_requests) == 2
    # Restarted once from the old cursor and once with none at all.
    again = h.tick(old_cursor, use_cursor=False)
    fresh = h.tick(None, use_cursor=False)
    # Both re-request the same run keys (the daemon drops duplicates), nothing else.
    keys = sorted(rr.run_key or "" for rr in data.run_requests)
    assert sorted(rr.run_key or "" for rr in again.run_requests) == keys
    assert sorted(rr.run_key or "" for rr in fresh.run_requests) == keys
    h.tick_and_run(ticks=5)
    assert sorted(h.stored_outputs()) == keys
    assert len(h.runs) == 2 and _paid(server) == 2


@pytest.mark.parametrize(
    "cursor",
    ["{not json", json.dumps({"version": 99, "position": "x"}), json.dumps([1, 2])],
    ids=["garbage", "other-version", "wrong-shape"],
)
def test_a_corrupt_or_old_cursor_is_recovered_from(
    instance: DagsterInstance,
    server: LocalOctoAIServer,
    tmp_path: Path,
    cursor: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    h = Harness(instance, server.url, tmp_path, _requests(2))
    h.submit_jobs()
    time.sleep(0.5)
    capfd.readouterr()
    data = h.tick(cursor, use_cursor=False)
    assert "cursor unreadable" in capfd.readouterr().err
    assert len(data.run_requests) == 2
    assert AsyncSensorCursor.parse(data.cursor).version == 1


@pytest.mark.parametrize(("interval_s", "rewritten"), [(0.0, True), (300.0, False)])
def test_the_sensor_takes_its_settings_object_poll_record_interval_included(
    instance: DagsterInstance,
    server: LocalOctoAIServer,
    tmp_path: Path,
    interval_s: float,
    rewritten: bool,
) -> None:
    """Every AsyncSensorSettings field reaches the ticker (this one had no parameter before)."""
    server.configure(async_queue_delay_s=60.0)  # the job stays pending across the ticks
    h = Harness(instance, server.url, tmp_path, _requests(1), poll_record_interval_s=interval_s)
    h.submit_jobs()
    h.tick()
    (first,) = h.ledger.iter_records()
    assert first.last_polled_at is not None
    time.sleep(0.05)
    h.tick()
    (second,) = h.ledger.iter_records()
    assert (second.last_polled_at != first.last_polled_at) is rewritten


def test_the_sensor_refuses_settings_of_another_type() -> None:
    results = octoai_async_results_asset("typed_images")
    with pytest.raises(TypeError, match="settings: expected an AsyncSensorSettings, got dict"):
        octoai_async_sensor(asset=results, settings={"max_concurrent_polls": 4})  # type: ignore[arg-type]


def test_an_expired_result_is_resubmitted_with_the_same_request_and_seed(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    server.configure(async_queue_delay_s=0.0)
    h = Harness(instance, server.url, tmp_path, _requests(1))
    h.submit_jobs()
    data = h.tick()
    (rr,) = data.run_requests
    server.configure(result_ttl_s=0.1)
    time.sleep(0.3)  # the result expires before the persist run gets to it
    failed = h.run(rr)
    assert not failed.success
    h.tick()  # sees the failed run, polls: 404, resubmits
    (record,) = h.ledger.iter_records()
    assert record.attempts == 2
    assert record.previous_response_ids == [rr.partition_key]
    assert record.request_model().seed == 100
    server.configure(result_ttl_s=3600)
    requested = h.tick_and_run(ticks=10)
    assert [r.partition_key for r in requested] == [record.response_id]
    assert sorted(h.stored_outputs()) == [record.response_id]
    manifest = h.stored_outputs()[record.response_id]
    assert [im["seed"] for r in manifest["results"] for im in r["images"]] == [100]
    assert _paid(server) == 2  # the first result was paid for and lost to expiry


def _submit_failing_jobs(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp: Path, n: int, max_resubmits: int
) -> Harness:
    """``n`` jobs submitted to a server on which every job fails 0.2 s after submission."""
    server.configure(faults={"job_failure": 1.0, "job_failure_after_s": 0.2})
    h = Harness(instance, server.url, tmp, _requests(n), max_resubmits=max_resubmits)
    h.submit_jobs()
    return h


def test_a_failed_job_is_resubmitted_then_reported_as_a_failed_run(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    h = _submit_failing_jobs(instance, server, tmp_path, n=1, max_resubmits=1)
    requested = h.tick_and_run(ticks=12, pause_s=0.3)
    (record,) = h.ledger.iter_records()
    assert record.state is JobState.FAILED
    assert record.attempts == 2 and len(record.previous_response_ids) == 1
    assert "gave up after 2 submission(s)" in (record.error or "")
    # The failure is a failed run of the results asset, with the job's details.
    (report,) = requested
    assert report.run_key == f"{record.response_id}:failed"
    (run,) = h.runs
    assert not run.success
    failure = run.get_step_failure_events()[0].step_failure_data
    assert failure.user_failure_data is not None
    meta = failure.user_failure_data.metadata
    assert meta["state"].value == "failed"  # type: ignore[attr-defined]
    assert meta["attempts"].value == 2  # type: ignore[attr-defined]
    assert meta["job"].value["request"]["seed"] == 100  # type: ignore[attr-defined]
    assert h.stored_outputs() == {}
    assert h.ledger.list_open() == []


def test_a_job_cancelled_on_the_server_is_recorded_cancelled_and_not_resubmitted(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    server.configure(async_queue_delay_s=30.0)  # still pending when it is cancelled
    h = Harness(instance, server.url, tmp_path, _requests(1))
    h.submit_jobs()
    (record,) = h.ledger.iter_records()
    with OctoAIClient(TOKEN, base_url=server.url) as client:
        assert client.cancel(record.async_job()).status is JobStatus.CANCELLED
    for _ in range(3):
        h.tick()
    (record,) = h.ledger.iter_records()
    assert record.state is JobState.CANCELLED and record.attempts == 1
    assert "cancelled on the server" in (record.error or "")
    assert server.stats()["async_jobs"]["submitted"] == 1  # never resubmitted


def test_a_job_that_fails_once_succeeds_on_resubmission(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    h = _submit_failing_jobs(instance, server, tmp_path, n=2, max_resubmits=2)
    for _ in range(20):
        h.tick()
        if any(r.attempts == 2 for r in h.ledger.iter_records()):
            break
        time.sleep(0.2)
    server.configure(faults={"job_failure": 0.0})
    h.tick_and_run(ticks=12, pause_s=0.3)
    records = list(h.ledger.iter_records())
    assert {r.state for r in records} == {JobState.PERSISTED}
    assert sorted(h.stored_outputs()) == sorted(r.response_id or "" for r in records)
    assert all(r.previous_response_ids for r in records)


def test_an_unknown_status_is_logged_and_polled_once_per_tick(
    instance: DagsterInstance, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    scripted: ScriptedServer
    with scripted_server() as scripted:
        poll_url = f"{scripted.url}/v1/requests/abc-123"
        scripted.script(Reply(201, {"response_id": "abc-123", "poll_url": poll_url}))
        scripted.default = Reply(200, {"status": "warming_up"})
        h = Harness(instance, scripted.url, tmp_path, _requests(1))
        h.submit_jobs()
        capfd.readouterr()
        for _ in range(3):
            data = h.tick()
            assert data.run_requests == []
        polls = [p for p in scripted.paths() if p == "GET /v1/requests/abc-123"]
        assert len(polls) == 3  # once per tick, never spun on
        assert "unknown status 'warming_up'" in capfd.readouterr().err
        (record,) = h.ledger.iter_records()
        assert record.state is JobState.SUBMITTED and record.raw_status == "warming_up"


def test_a_lost_submission_is_resubmitted_after_the_grace_period(
    instance: DagsterInstance, server: LocalOctoAIServer, tmp_path: Path
) -> None:
    h = Harness(instance, server.url, tmp_path, intent_grace_s=0.0)
    req = ImageGenerationRequest(prompt="a fox", engine="sd", seed=5, steps=5)
    # The process died between the intent and the POST's answer.
    h.ledger.record_intent(
        JobRecord.new(req, asset_key="async_images", partition_key=None, job_id="lost")
    )
    h.tick_and_run(ticks=8)
    record = h.ledger.get("lost")
    assert record is not None and record.state is JobState.PERSISTED
    assert record.attempts == 2
    assert list(h.stored_outputs()) == [record.response_id]


def test_the_sensor_needs_a_dynamic_partitioned_asset() -> None:
    from dagster import asset

    @asset
    def plain() -> None: ...

    with pytest.raises(ValueError, match="DynamicPartitionsDefinition"):
        octoai_async_sensor(asset=plain)


def test_the_sensors_runs_carry_a_named_job(tmp_path: Path) -> None:
    from dagster import AssetSelection, Definitions, define_asset_job

    images = octoai_async_results_asset("heron_images", io_manager_key="images")
    resources = {
        "octoai": OctoAIResource(base_url="http://127.0.0.1:9"),
        "octoai_ledger": JobLedgerResource(base_dir=str(tmp_path)),
        "images": LocalImageIOManager(base_dir=str(tmp_path)),
    }
    # By default, a job named after the asset (not `__anonymous_asset_job_<sensor>`).
    sensor = octoai_async_sensor(asset=images, name="heron_sensor")
    defs = Definitions(assets=[images], sensors=[sensor], resources=resources)
    assert sensor.job_name == "heron_images_persist_job"
    job = defs.resolve_job_def("heron_images_persist_job")
    assert job.partitions_def == images.partitions_def
    # Or one of the project's own.
    own = define_asset_job("persist_herons", selection=AssetSelection.assets(images))
    named = octoai_async_sensor(asset=images, name="heron_sensor", job=own)
    assert named.job_name == "persist_herons"
