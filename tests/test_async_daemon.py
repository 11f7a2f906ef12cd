"""End to end with the real Dagster daemon: a submitted job ends up persisted, untouched by hand.

``dagster-daemon run`` runs in its own session with a temp ``DAGSTER_HOME``
(telemetry off), loads a definitions file whose sensor is running by default,
and launches the persist runs itself; the test only submits jobs and waits for
the ledger and the image store to show them persisted. The daemon is stopped by
signalling its process group (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.storage.backends import LocalBackend
from dagster_octoai.storage.ledger import JobLedger, JobState

TOKEN = "daemon-test-token"

DEFINITIONS = textwrap.dedent(
    """
    import os

    from dagster import DefaultSensorStatus, Definitions, in_process_executor

    from dagster_octoai.async_assets import (
        octoai_async_results_asset,
        octoai_async_submit_asset,
    )
    from dagster_octoai.io_managers import LocalImageIOManager
    from dagster_octoai.resources import JobLedgerResource
    from dagster_octoai.resources import OctoAIResource
    from dagster_octoai.sensors import octoai_async_sensor

    results = octoai_async_results_asset("daemon_images")
    submit = octoai_async_submit_asset(
        "daemon_jobs",
        [{"prompt": f"a lighthouse {i}", "engine": "sd", "seed": i, "steps": 5} for i in range(2)],
        results_asset=results,
    )
    defs = Definitions(
        assets=[submit, results],
        executor=in_process_executor,
        sensors=[
            octoai_async_sensor(
                asset=results,
                minimum_interval_seconds=1,
                default_status=DefaultSensorStatus.RUNNING,
            )
        ],
        resources={
            "octoai": OctoAIResource(token=os.environ["TEST_OCTOAI_TOKEN"],
                                     base_url=os.environ["TEST_OCTOAI_URL"]),
            "octoai_ledger": JobLedgerResource(base_dir=os.environ["TEST_LEDGER_DIR"]),
            "io_manager": LocalImageIOManager(base_dir=os.environ["TEST_IMAGES_DIR"]),
        },
    )
    """
)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def server() -> Iterator[LocalOctoAIServer]:
    with LocalOctoAIServer(ServerConfig(token=TOKEN, async_queue_delay_s=1.0)) as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_the_daemon_persists_submitted_jobs(
    server: LocalOctoAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    defs_file = tmp_path / "defs.py"
    defs_file.write_text(DEFINITIONS)
    ledger_dir, images_dir = tmp_path / "ledger", tmp_path / "images"
    env = {
        "DAGSTER_HOME": str(home),
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "TEST_OCTOAI_TOKEN": TOKEN,
        "TEST_OCTOAI_URL": server.url,
        "TEST_LEDGER_DIR": str(ledger_dir),
        "TEST_IMAGES_DIR": str(images_dir),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    # Submit through the same instance the daemon uses, as a user's run would.
    sys.path.insert(0, str(tmp_path))
    try:
        import defs as user_defs  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    instance = DagsterInstance.from_config(str(home))
    try:
        resources = user_defs.defs.resources
        assert materialize([user_defs.submit], instance=instance, resources=resources).success
    finally:
        instance.dispose()
        sys.modules.pop("defs", None)

    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-f", str(defs_file)],
        env={**os.environ, **env},
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ledger = JobLedger(LocalBackend(ledger_dir))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            records = list(ledger.iter_records())
            if records and all(r.state is JobState.PERSISTED for r in records):
                break
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-4000:]
            time.sleep(1)
    finally:
        _stop_group(proc)
        log.close()
    records = list(ledger.iter_records())
    states = {r.job_id: r.state for r in records}
    assert len(records) == 2 and set(states.values()) == {JobState.PERSISTED}, (
        states,
        (tmp_path / "daemon.log").read_text()[-4000:],
    )
    manifests = sorted(
        (images_dir / "dagster-octoai" / "daemon_images").glob("partition=*/manifest.json")
    )
    assert sorted(m.parent.name.removeprefix("partition=") for m in manifests) == sorted(
        r.response_id or "" for r in records
    )
    for m in manifests:
        data = json.loads(m.read_text())
        assert data["image_count"] == 1
    assert server.stats()["paid_generations"] == 2
    assert ledger.list_open() == []
