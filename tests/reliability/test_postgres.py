"""The sensor and the IO manager on a Postgres-backed Dagster instance (dagster-postgres).

The suite starts its own PostgreSQL cluster (``devtools.postgres``) and
points the instance's run, event and schedule storage at a fresh database:

- the async sensor's ticks run against it (jobs submitted to the local server, ticks
  evaluated with ``build_sensor_context(instance=..., instance_ref=...)``, each
  requested run executed) and every image is persisted once on SeaweedFS through
  ``S3ImageIOManager``;
- a job of the image asset and a downstream asset runs under the multiprocess
  executor (each step its own process, reading the Postgres instance), the
  downstream step loading the images through the S3 IO manager.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.reconstruct import ReconstructableJob

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.storage.ledger import JobState
from dagster_octoai.testing.seaweedfs import SeaweedFS
from devtools.postgres import PostgresCluster
from devtools.secrets import TokenScanner

from . import _pg_jobs
from ._sensor_support import (
    JOBS,
    TOTAL,
    DaemonTicks,
    SensorSetup,
    materializations_by_partition,
    sensor_settings,
)
from ._support import LEAK_TOKEN, Figures, inventory, manifest_problems, stored_once

# One worker of a parallel run starts the session's cluster (and installs PostgreSQL
# first on a machine without it: two apt-gets at once would fight over dpkg's lock):
# the ``postgres`` group of tests/conftest.py.


@pytest.fixture
def pg_instance(postgres: PostgresCluster, tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance whose storage is a fresh database on the suite's cluster."""
    url = postgres.create_database("dagster_" + secrets.token_hex(4))
    overrides = {"storage": {"postgres": {"postgres_url": url}}}
    home = tmp_path / "home"
    home.mkdir()
    with dg.instance_for_test(overrides=overrides, temp_dir=str(home)) as instance:
        yield instance


def _storage_kinds(instance: dg.DagsterInstance) -> set[str]:
    return {
        type(instance.run_storage).__name__,
        type(instance.event_log_storage).__name__,
        type(instance.schedule_storage).__name__,
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sensor_ticks_persist_every_job_once_on_a_postgres_instance(
    pg_instance: dg.DagsterInstance,
    octoai_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
    bucket: str,
    tmp_path: Path,
    scanner: TokenScanner,
    figures: Figures,
) -> None:
    assert _storage_kinds(pg_instance) == {
        "PostgresRunStorage",
        "PostgresEventLogStorage",
        "PostgresScheduleStorage",
    }
    setup = SensorSetup(
        sensor_settings(octoai_server.url, seaweedfs, bucket, tmp_path / "ledger", "postgres")
    )
    octoai_server.reset_stats()
    setup.submit_jobs(pg_instance)
    ticks = DaemonTicks(setup, pg_instance, tmp_path / "sensor.cursor")
    ticks.tick_until_final()
    # Ticking again, from the saved cursor or from none, asks for nothing.
    assert ticks.tick() == [] and ticks.tick(None, use_saved=False) == []
    paid = octoai_server.stats()["paid_generations"]

    records = list(setup.ledger.iter_records())
    assert {r.state for r in records} == {JobState.PERSISTED} and len(records) == JOBS
    response_ids = sorted(r.response_id or "" for r in records)
    assert materializations_by_partition(pg_instance, "kelp_images") == dict.fromkeys(
        response_ids, 1
    )
    assert sorted(ticks.log.launched) == response_ids  # run_key = response id, once each
    partitions = pg_instance.get_dynamic_partitions("kelp_images_jobs")
    assert sorted(partitions) == response_ids
    client = seaweedfs.client()
    inv = stored_once(client, bucket, images=TOTAL, manifests=JOBS)
    assert paid == TOTAL

    leaks, events = scanner.scan_instance(pg_instance)
    s3_leaks, _ = scanner.scan_s3(client, bucket)
    leaks += scanner.scan_files(tmp_path)
    assert events > 0 and leaks == [] and s3_leaks == []
    figures.record(
        "Async sensor on a Postgres instance",
        images_requested=TOTAL,
        images_persisted=len(inv.images),
        duplicates_in_s3=inv.duplicate_contents,
        paid_generations=paid,
        leaks_found=len(leaks) + len(s3_leaks),
        ticks=ticks.log.ticks,
        persist_runs=len(ticks.log.launched),
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_image_job_runs_under_the_multiprocess_executor_on_a_postgres_instance(
    pg_instance: dg.DagsterInstance,
    octoai_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    scanner: TokenScanner,
    figures: Figures,
) -> None:
    # The step processes build their resources from these.
    for name, value in {
        "OCTOAI_TOKEN": LEAK_TOKEN,
        "PG_TEST_OCTOAI_URL": octoai_server.url,
        "PG_TEST_BUCKET": bucket,
        "PG_TEST_S3_ENDPOINT": seaweedfs.endpoint_url,
        "PG_TEST_S3_KEY": seaweedfs.access_key,
        "PG_TEST_S3_SECRET": seaweedfs.secret_key,
    }.items():
        monkeypatch.setenv(name, value)
    octoai_server.reset_stats()
    # What reconstructable() builds, but by file: the step processes load _pg_jobs.py by
    # path (this test package is not importable from the working directory).
    job = ReconstructableJob.for_file(_pg_jobs.__file__, "pg_image_job")
    with dg.execute_job(job, instance=pg_instance) as result:
        assert result.success
        step_pids = {
            event.pid
            for event in result.all_events
            if event.event_type == dg.DagsterEventType.STEP_START
        }
    run = pg_instance.get_run_by_id(result.run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    # Two steps, each in a process of its own.
    assert len(step_pids) == 2

    client = seaweedfs.client()
    inv = inventory(client, bucket, "")
    assert sorted(inv.seeds()) == [5, 6, 7] and len(inv.manifests) == 1
    assert manifest_problems(client, bucket, inv) == []
    # The downstream step read every stored byte back, in another process.
    [record] = pg_instance.fetch_materializations(dg.AssetKey("pg_reef_sizes"), limit=5).records
    assert record.asset_materialization is not None
    sizes = {k: v.value for k, v in record.asset_materialization.metadata.items()}
    assert sizes["images"] == 3 and sizes["bytes"] == sum(inv.sizes[k] for k in inv.images)
    assert sizes["pid"] in step_pids and sizes["pid"] != os.getpid()
    paid = octoai_server.stats()["paid_generations"]
    assert paid == 3

    leaks, events = scanner.scan_instance(pg_instance)
    s3_leaks, _ = scanner.scan_s3(client, bucket)
    assert events > 0 and leaks == [] and s3_leaks == []
    figures.record(
        "Image job, multiprocess executor, Postgres instance",
        images_requested=3,
        images_persisted=len(inv.images),
        duplicates_in_s3=inv.duplicate_contents,
        paid_generations=paid,
        leaks_found=len(leaks) + len(s3_leaks),
        step_processes=len(step_pids),
    )


def test_cluster_refuses_a_bad_database_name_and_stops_without_a_trace(
    postgres: PostgresCluster,
) -> None:
    with pytest.raises(ValueError, match="name: 'bad; DROP' is not allowed"):
        postgres.create_database("bad; DROP")
    cluster = PostgresCluster().start()
    pid, workdir = cluster.pid, cluster.workdir
    assert pid is not None and workdir is not None and Path(f"/proc/{pid}").exists()
    cluster.stop()
    assert not workdir.exists() and cluster.pid is None
    # The postmaster is gone (or, if pid 1 has not reaped it yet, a zombie).
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "zombie" in status.read_text()
