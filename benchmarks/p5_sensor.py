"""P5: the async sensor with 10,000 pending jobs: tick time, cursor size, coverage.

The jobs are real: the product's submit asset (``octoai_async_submit_asset``,
8 submissions in flight) POSTs 10,000 async requests to the local server and records
each in a ``JobLedgerResource`` on a local directory (fsync on, the default); the
server keeps them all ``pending`` (``async_queue_delay_s`` of an hour). Then the real
sensor (``octoai_async_sensor``, default settings: 16 polls in flight, a 25 s tick
budget) is evaluated tick after tick with ``build_sensor_context`` on a sqlite
``DagsterInstance``, carrying its cursor, as the daemon would. Each tick's wall time
and cursor size are recorded, and which jobs it reached (the tick report's
``reached`` count, and the walk's position).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from dagster import DagsterInstance, build_sensor_context, materialize

from dagster_octoai.async_assets import octoai_async_results_asset, octoai_async_submit_asset
from dagster_octoai.io_managers import LocalImageIOManager
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from dagster_octoai.sensors import octoai_async_sensor
from dagster_octoai.storage.ticker import AsyncSensorCursor

from ._common import TOKEN, Row, Settings, octoai_server

TICKS = 3
TICK_LIMIT_S = 30.0
CURSOR_LIMIT_BYTES = 1024 * 1024


def _requests(count: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"a paper boat {i}", "engine": "sd", "seed": i, "steps": 10}
        for i in range(count)
    ]


def run(settings: Settings) -> list[Row]:
    count = settings.n(10_000, 30)
    tick_s: list[float] = []
    cursor_bytes: list[int] = []
    reached: list[int] = []
    open_jobs: list[int] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        # Every job stays queued (pending) on the server, in a directory job store as
        # 'dagster-octoai serve' keeps them, with no bound on how many.
        octoai_server(
            async_queue_delay_s=3600.0,
            replicas=4,
            max_queued_jobs=None,
            state_dir=str(Path(tmp) / "server-jobs"),
        ) as server,
    ):
        instance = DagsterInstance.local_temp(tmp)
        octoai = OctoAIResource(token=TOKEN, base_url=server.url)
        ledger = JobLedgerResource(base_dir=str(Path(tmp) / "ledger"))
        results = octoai_async_results_asset("p5_images")
        submit = octoai_async_submit_asset("p5_jobs", _requests(count), results_asset=results)
        sensor = octoai_async_sensor(asset=results)
        started = time.perf_counter()
        submitted = materialize(
            [submit],
            instance=instance,
            resources={
                "octoai": octoai,
                "octoai_ledger": ledger,
                "io_manager": LocalImageIOManager(base_dir=str(Path(tmp) / "images")),
            },
        )
        submit_s = time.perf_counter() - started
        assert submitted.success
        pending = server.stats()["async_jobs"].get("pending", 0)
        cursor: str | None = None
        seen_total = 0
        for _ in range(TICKS):
            with build_sensor_context(
                instance=instance,
                cursor=cursor,
                resources={"octoai": octoai, "octoai_ledger": ledger},
            ) as context:
                started = time.perf_counter()
                data = sensor.evaluate_tick(context)
                tick_s.append(time.perf_counter() - started)
            cursor = data.cursor
            assert cursor is not None
            cursor_bytes.append(len(cursor.encode()))
            state = AsyncSensorCursor.parse(cursor)
            seen_total = state.polls
            open_jobs.append(len(ledger.get_ledger().list_open()))
            reached.append(seen_total)
        polls = server.stats()["requests"].get("GET /v1/requests/{response_id}", {})
    all_reached = seen_total >= count
    return [
        Row(
            id="P5",
            scenario=(
                f"async sensor, {count} pending jobs (real submissions, local-directory ledger), "
                f"{TICKS} consecutive ticks, default settings"
            ),
            baseline="-",
            figure="seconds per tick (every tick must meet the target)",
            unit="s",
            samples=tick_s,
            target=TICK_LIMIT_S,
            judge="max",
            details={
                "tick_s": [round(t, 2) for t in tick_s],
                "cursor_bytes": cursor_bytes,
                "jobs_polled_cumulative": reached,
                "open_jobs_after_tick": open_jobs,
                "server_pending_jobs": pending,
                "server_polls_answered": polls,
                "submit_run_s": round(submit_s, 1),
            },
            checks={
                f"cursor <= 1 MB (max {max(cursor_bytes)} bytes)": max(cursor_bytes)
                <= CURSOR_LIMIT_BYTES,
                f"all {count} jobs reached within {TICKS} ticks": all_reached,
            },
        )
    ]
