"""Concurrency pools hold the endpoint's replica count across steps and runs.

Two runs launched at once by the ``dagster`` CLI (each under the multiprocess executor,
four generation steps each, up to four at a time) share one instance whose ``octoai``
pool is limited to 2 in ``dagster.yaml``. The local server, which would run eight at
once, counts the most generations it ever had in flight: never more than 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance

from dagster_octoai.server import LocalOctoAIServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROJECT = """
from dagster import Definitions, define_asset_job, multiprocess_executor

from dagster_octoai import OctoAIResource, octoai_image_asset

frames = [
    octoai_image_asset(f"frame_{i}", {"engine": "sd", "prompt": f"frame {i}", "seed": i})
    for i in range(4)
]
# Up to four steps of a run at once: without the pool, two runs would send eight.
frames_job = define_asset_job(
    "frames_job",
    frames,
    executor_def=multiprocess_executor.configured({"max_concurrent": 4}),
)
defs = Definitions(
    assets=frames,
    jobs=[frames_job],
    # Base URL and token from OCTOAI_BASE_URL and OCTOAI_TOKEN.
    resources={"octoai": OctoAIResource(timeout_s=60)},
)
"""

LIMIT = 2
#: Both runs take seconds (tens on a loaded box): far past that, they are stuck.
RUN_TIMEOUT_S = 300


def _instance_home(root: Path, limit: int) -> Path:
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        textwrap.dedent(
            f"""
            telemetry:
              enabled: false
            concurrency:
              pools:
                default_limit: {limit}
            """
        )
    )
    # The instance's databases made here, once: two runs starting on an empty home would
    # both create them and race on the schema's version row (seen under load).
    with DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs(limit=1)
        instance.event_log_storage.get_concurrency_keys()
    return home


def _launch_runs(root: Path, home: Path, server: LocalOctoAIServer, count: int) -> list[Any]:
    """Launch ``count`` runs of the job at once; each one's exit code and output.

    The output goes to a file (left in ``root`` for a look after a failure), and a run
    that takes far too long fails the test with what both runs said: a step process that
    ends without reporting keeps its pool slot, and the other steps would wait for ever.
    """
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "OCTOAI_BASE_URL": server.url,
        "OCTOAI_TOKEN": server.token or "",
        "PYTHONPATH": str(root),
    }
    command = [sys.executable, "-m", "dagster", "job", "execute", "-m", "poolproj", "-j"]
    logs = [root / f"run-{i}.log" for i in range(count)]
    runs = []
    for log in logs:
        with log.open("w") as out:
            runs.append(
                subprocess.Popen(
                    [*command, "frames_job"],
                    cwd=root,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        codes = [run.wait(timeout=RUN_TIMEOUT_S) for run in runs]
    except subprocess.TimeoutExpired:
        for run in runs:
            run.kill()
            run.wait()
        told = "\n----\n".join(log.read_text()[-3000:] for log in logs)
        pytest.fail(f"the runs took over {RUN_TIMEOUT_S} s:\n{told}")
    return [(code, log.read_text()) for code, log in zip(codes, logs, strict=True)]


def test_two_runs_never_have_more_generations_in_flight_than_the_pool_allows(
    octoai_server_factory: Any, tmp_path: Path
) -> None:
    # Eight replicas and a second per image: the server itself would not hold anything back.
    server = octoai_server_factory(latency_per_image_s=1.0, replicas=8)
    (tmp_path / "poolproj.py").write_text(PROJECT)
    home = _instance_home(tmp_path, LIMIT)

    outputs = _launch_runs(tmp_path, home, server, count=2)

    for code, out in outputs:
        assert code == 0, out[-3000:]
        assert "RUN_SUCCESS" in out, out[-3000:]
    stats = server.stats()
    assert stats["generation_requests"] == 8  # every step of both runs generated
    assert stats["in_flight_max"] <= LIMIT, stats
    # The steps queued for the pool's slots rather than failing.
    assert any("Step blocked by limit for pool octoai" in out for _, out in outputs)
