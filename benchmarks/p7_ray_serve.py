"""P7: the endpoint on Ray Serve with 1 and 2 generator replicas, against one server process.

Each replica stands for a GPU: 0.1 s per image (``latency_per_image_s``), one generation
at a time. The baseline is ``dagster-octoai serve`` in one process with the same number
of replicas (``replicas=N``, its in-process queue). A closed loop of ``2 x N`` clients
keeps requests in flight for a few seconds; the figure is Ray's throughput over the single
process's, measured in the same run. On a 2-core box expect about 1x (Ray's proxy, frontend
and generator hops cost CPU that the box does not have to spare); the row exists for a
machine with GPUs and nodes, where the single process stops at one machine and Ray does not.

Not part of ``--quick`` (a Ray cluster takes a minute to start here): run it with
``python -m benchmarks --only P7``.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from typing import Any

import httpx

from dagster_octoai.server import ServerConfig

from ._common import TOKEN, Row, Settings, octoai_server

LATENCY_S = 0.1
BODY = {"prompt": "a lighthouse", "seed": 1}


async def _closed_loop(url: str, clients: int, duration_s: float) -> float:
    """Requests per second that ``clients`` concurrent callers complete in ``duration_s``."""
    done = 0
    deadline = time.perf_counter() + duration_s

    async def caller(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            answer = await client.post("/generate/sd", json=BODY)
            answer.raise_for_status()
            done += 1

    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        await client.post("/generate/sd", json=BODY)  # warm: connections, a replica
        started = time.perf_counter()
        await asyncio.gather(*(caller(client) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return done / elapsed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(settings: Settings) -> list[Row]:
    import ray
    from ray import serve

    from dagster_octoai.server.ray_config import RayEndpointConfig
    from dagster_octoai.server.ray_serve import deploy, start_local_cluster, start_serve

    duration_s = 2.0 if settings.quick else 8.0
    single: dict[int, list[float]] = {1: [], 2: []}
    on_ray: dict[int, list[float]] = {1: [], 2: []}
    port = _free_port()
    start_local_cluster(num_cpus=4, log_to_driver=False)
    try:
        start_serve({"host": "127.0.0.1", "port": port})
        for replicas in (1, 2):
            endpoint = RayEndpointConfig(
                server=ServerConfig(token=TOKEN, latency_per_image_s=LATENCY_S),
                min_replicas=replicas,
                max_replicas=replicas,
                max_queued_requests=1000,
            )
            deploy(endpoint, name="bench", route_prefix="/")
            with octoai_server(latency_per_image_s=LATENCY_S, replicas=replicas) as baseline:
                for _ in range(settings.reps):
                    # Interleaved, so that the box's load drifts over both alike.
                    single[replicas].append(
                        asyncio.run(_closed_loop(baseline.url, 2 * replicas, duration_s))
                    )
                    on_ray[replicas].append(
                        asyncio.run(
                            _closed_loop(f"http://127.0.0.1:{port}", 2 * replicas, duration_s)
                        )
                    )
            serve.delete("bench")
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    rows = []
    for replicas in (1, 2):
        ratios = [r / s for r, s in zip(on_ray[replicas], single[replicas], strict=True)]
        details: dict[str, Any] = {
            "ray_rps": [round(v, 2) for v in on_ray[replicas]],
            "single_process_rps": [round(v, 2) for v in single[replicas]],
            "ideal_rps": replicas / LATENCY_S,
            "latency_per_image_s": LATENCY_S,
            "clients": 2 * replicas,
            "duration_s": duration_s,
        }
        rows.append(
            Row(
                id=f"P7-ray-{replicas}",
                scenario=f"Ray Serve endpoint, {replicas} generator replica(s), 0.1 s/image",
                baseline=f"one server process with replicas={replicas}",
                figure="throughput, Ray / single process",
                unit="x",
                samples=ratios,
                target=None,
                details=details,
                checks={"ray served": statistics.median(on_ray[replicas]) > 0},
            )
        )
    return rows
