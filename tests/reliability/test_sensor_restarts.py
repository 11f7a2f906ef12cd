"""The async sensor's process SIGKILLed at six points, then resumed: nothing lost, nothing doubled.

Each case submits 4 async jobs x 2 images into a job ledger on a sqlite instance in a
temp dir, then a child process ticks the sensor as the daemon does (evaluate, add
the partitions, save the cursor, launch each run by ``run_key``) and SIGKILLs
itself at one point:

- ``mid_poll``: three of four polls answered, nothing returned from the tick;
- ``after_completed_recorded``: a job recorded completed, its run request lost;
- ``before_cursor_saved``: the tick's run requests and cursor both lost;
- ``before_runs_launched``: the cursor saved, no run launched;
- ``mid_persist_upload``: a persist run killed with three images in S3, no manifest;
- ``before_ledger_persisted``: a persist run killed after the IO manager stored the
  output, before the ledger was told.

The test then marks the dead run failed (as Dagster's run monitoring does) and
resumes with fresh ticks from the last saved cursor until every job is final.
Every image is in S3 once, each job's partition is materialized once, no run key is
launched twice, and nothing is generated twice.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import dagster as dg
import pytest

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.storage.ledger import JobState
from dagster_octoai.testing.seaweedfs import SeaweedFS
from devtools.secrets import TokenScanner

from ._children import run_child
from ._sensor_support import (
    JOBS,
    SENSOR_KILL_POINTS,
    TOTAL,
    DaemonTicks,
    SensorSetup,
    fail_dead_runs,
    materializations_by_partition,
    sensor_child,
    sensor_settings,
)
from ._support import Figures, stored_once


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", list(SENSOR_KILL_POINTS))
def test_killed_sensor_resumes_from_its_cursor_without_losing_or_doubling(
    point: str,
    octoai_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
    bucket: str,
    dagster_home: Path,
    tmp_path: Path,
    scanner: TokenScanner,
    figures: Figures,
) -> None:
    home = str(dagster_home)
    cursor_file = tmp_path / "sensor.cursor"
    log_path = tmp_path / "child.log"
    tag = f"{point}-{secrets.token_hex(3)}"
    settings = sensor_settings(octoai_server.url, seaweedfs, bucket, tmp_path / "ledger", tag)
    setup = SensorSetup(settings)
    octoai_server.reset_stats()
    with dg.DagsterInstance.from_config(home) as instance:
        setup.submit_jobs(instance)

    code = run_child(sensor_child, settings, home, str(cursor_file), point, str(log_path))
    assert code == -9, f"exit {code}: {log_path.read_text()[-3000:]}"
    cursor_at_crash = cursor_file.read_text() if cursor_file.exists() else None

    with dg.DagsterInstance.from_config(home) as instance:
        dead_runs = fail_dead_runs(instance)
        ticks = DaemonTicks(setup, instance, cursor_file)
        ticks.tick_until_final()
        # A tick from the cursor saved before the crash finds nothing left to do.
        assert ticks.tick(cursor_at_crash, use_saved=False) == []
        materialized = materializations_by_partition(instance, "kelp_images")
        run_keys = [
            r.tags.get("dagster/run_key")
            for r in instance.get_runs()
            if "dagster/run_key" in r.tags
        ]
        instance_leaks, events = scanner.scan_instance(instance)
    paid = octoai_server.stats()["paid_generations"]

    records = list(setup.ledger.iter_records())
    assert len(records) == JOBS and {r.state for r in records} == {JobState.PERSISTED}
    response_ids = sorted(r.response_id or "" for r in records)
    # Each job's partition materialized exactly once; no run key launched twice.
    assert materialized == dict.fromkeys(response_ids, 1)
    assert len(run_keys) == len(set(run_keys))
    client = seaweedfs.client()
    inv = stored_once(client, bucket, images=TOTAL, manifests=JOBS)
    # Nothing was generated twice: no job was resubmitted.
    assert paid == TOTAL and all(r.attempts == 1 for r in records)

    leaks = instance_leaks + scanner.scan_files(tmp_path)
    s3_leaks, _ = scanner.scan_s3(client, bucket)
    assert events > 0 and leaks == [] and s3_leaks == []
    figures.record(
        f"Sensor SIGKILLed {point.replace('_', ' ')}, then resumed from its cursor",
        images_requested=TOTAL,
        images_persisted=len(inv.images),
        duplicates_in_s3=inv.duplicate_contents,
        paid_generations=paid,
        leaks_found=len(leaks) + len(s3_leaks),
        runs_killed=dead_runs,
        ticks_after_restart=ticks.log.ticks,
        run_keys_launched=len(run_keys),
    )
