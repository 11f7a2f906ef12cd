"""P8: the durable async job store: throughput against memory, and a restart with 10,000 jobs.

1. **Async throughput**: the server (a child process, placeholder images, 8 replicas)
   takes ``count`` async jobs from 16 concurrent submitters and polls each to
   ``completed``; jobs/second with the local-directory store and with the S3 store
   (SeaweedFS), each against the in-memory store in the same run. Target: >= 0.9x. Two
   loads: instant images (the store's overhead alone, with SeaweedFS, the server and the
   clients on the same cores) and a 0.5 s render per image (``RENDER_S``).
2. **Restart to first result**: a directory store holding 10,000 completed jobs (written
   through :class:`~dagster_octoai.server.jobstore.JobStore`, as a server writes them);
   a server process starts on it and a client fetches one stored result. The figure is the
   time from the server answering its first health check to that result, beside the
   start-up itself. Target: under 1 s.

Run: ``.venv/bin/python -m benchmarks --only P8 [--quick]``
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from dagster_octoai.api.models import JobStatus
from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.server.jobstore import JobStore
from dagster_octoai.server.security import Gatekeeper
from dagster_octoai.storage.backends import LocalBackend

from ._common import TOKEN, Row, Settings, seaweedfs

TARGET_RATIO = 0.9
TARGET_RESTART_S = 1.0
BODY = {"prompt": "a lighthouse", "seed": 1}
#: The second throughput rows' render time per image: a stand-in for a fast few-step engine
#: on a GPU (a choice, not a measured figure). 8 replicas then serve at most 16 jobs/s.
RENDER_S = 0.5


async def _throughput(url: str, count: int, concurrency: int = 16) -> float:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=60, limits=limits
    ) as client:
        slots = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with slots:
                answer = await client.post(
                    "/generate/sd", json=BODY, headers={"X-OctoAI-Async": "1"}
                )
                answer.raise_for_status()
                poll = answer.json()["poll_url"]
                while (await client.get(poll)).json()["status"] != "completed":
                    await asyncio.sleep(0.01)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        return count / (time.perf_counter() - started)


@contextlib.contextmanager
def _s3_env(fields: dict[str, Any]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in fields}
    os.environ.update(fields)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cpu_s(pid: int | None) -> float:
    """CPU time (user + system) of another process so far, seconds (Linux /proc)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(
    count: int, weed_pid: int | None = None, render_s: float = 0.0, **store: Any
) -> tuple[float, float, float]:
    """Jobs per second, and the server's and SeaweedFS's CPU milliseconds per job."""
    config = ServerConfig(
        token=TOKEN,
        replicas=8,
        max_queued_jobs=None,
        latency_per_image_s=render_s,
        **store,
    )
    with LocalOctoAIServer(config, mode="process") as server:
        server_cpu, weed_cpu = _cpu_s(server.pid), _cpu_s(weed_pid)
        rate = asyncio.run(_throughput(server.url, count))
        return (
            rate,
            (_cpu_s(server.pid) - server_cpu) / count * 1000,
            (_cpu_s(weed_pid) - weed_cpu) / count * 1000,
        )


def _throughput_rows(settings: Settings, render_s: float = 0.0) -> list[Row]:
    """One row per durable store, each against the in-memory store in the same reps.

    ``render_s`` is each image's render time (the placeholder backend sleeps it on its
    replica): 0 measures the store's overhead alone, on a box where SeaweedFS, the server
    and the 16 clients share the cores; a render time is what a server's throughput is.
    """
    count = settings.n(2000, 40) if not render_s else settings.n(400, 40)
    # Per store: (jobs/s, server CPU ms per job, SeaweedFS CPU ms per job) of each rep.
    memory: list[tuple[float, float, float]] = []
    local: list[tuple[float, float, float]] = []
    s3: list[tuple[float, float, float]] = []
    with seaweedfs() as weed:
        client = weed.client()
        bucket = "p8-" + secrets.token_hex(4)
        client.create_bucket(Bucket=bucket)
        env = {
            "AWS_ACCESS_KEY_ID": weed.access_key,
            "AWS_SECRET_ACCESS_KEY": weed.secret_key,
            "AWS_DEFAULT_REGION": weed.region,
        }
        for rep in range(settings.reps):
            memory.append(_rate(count, render_s=render_s))
            with tempfile.TemporaryDirectory() as tmp:
                local.append(_rate(count, render_s=render_s, state_dir=tmp))
            with _s3_env(env):
                s3.append(
                    _rate(
                        count,
                        weed.pid,
                        render_s=render_s,
                        jobs_url=f"s3://{bucket}/rep{rep}-{render_s}",
                        jobs_endpoint_url=weed.endpoint_url,
                    )
                )
    rows = []
    for name, runs in (("local directory", local), ("S3 (SeaweedFS)", s3)):
        details: dict[str, Any] = {
            "jobs_per_s": [round(r[0], 1) for r in runs],
            "memory_jobs_per_s": [round(m[0], 1) for m in memory],
            "server_cpu_ms_per_job": [round(r[1], 1) for r in runs],
            "memory_server_cpu_ms_per_job": [round(m[1], 1) for m in memory],
        }
        if runs is s3:
            details["seaweedfs_cpu_ms_per_job"] = [round(r[2], 1) for r in runs]
        rows.append(
            Row(
                id="P8",
                scenario=(
                    f"server async throughput, {count} jobs, {name} job store, "
                    + (f"{render_s:g} s render per image" if render_s else "instant images")
                ),
                baseline="in-memory job store, same run",
                figure="jobs/s ratio (store / memory)",
                unit="x",
                samples=[r[0] / m[0] for r, m in zip(runs, memory, strict=True)],
                target=TARGET_RATIO,
                comparison=">=",
                details=details,
            )
        )
    return rows


def _fill(state_dir: str, count: int) -> str:
    """``count`` completed jobs in a directory store; the response id of the last one."""
    store = JobStore(LocalBackend(state_dir))
    # The owner a server on this store derives from the token (its key is the store's).
    owner = Gatekeeper(ServerConfig(token=TOKEN), store.owner_key).owner_of(TOKEN.encode())
    rid = ""
    for _ in range(count):
        job = store.create(owner, "sd", b'{"prompt":"x"}')
        rid = job.response_id
        store.put_result(rid, b'{"images":[],"prediction_time_ms":0}')
        store.swap(rid, lambda j: j.evolve(status=JobStatus.COMPLETED, finished_at=time.time()))
        store.finish_files(rid)
    return rid


def _restart_row(settings: Settings) -> Row:
    count = settings.n(10_000, 200)
    first_result_s: list[float] = []
    startup_s: list[float] = []
    served: list[bool] = []
    with tempfile.TemporaryDirectory() as tmp:
        last = _fill(tmp, count)
        config = ServerConfig(token=TOKEN, state_dir=tmp)
        for _ in range(settings.reps):
            server = LocalOctoAIServer(config, mode="process", controls=False)
            server.start()
            try:
                up = time.perf_counter()
                answer = httpx.get(
                    f"{server.url}/v1/responses/{last}",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=30,
                )
                first_result_s.append(time.perf_counter() - up)
                served.append(answer.status_code == 200)
                startup_s.append(server.startup_s or 0.0)
            finally:
                server.stop()
    return Row(
        id="P8",
        scenario=f"restart on a directory store holding {count} completed jobs",
        baseline="-",
        figure="seconds from the first health check to the first result served",
        unit="s",
        samples=first_result_s,
        target=TARGET_RESTART_S,
        details={"server_startup_s": [round(s, 2) for s in startup_s]},
        checks={"the stored result was served after every restart": all(served)},
    )


def run(settings: Settings) -> list[Row]:
    return [
        *_throughput_rows(settings),
        *_throughput_rows(settings, render_s=RENDER_S),
        _restart_row(settings),
    ]
