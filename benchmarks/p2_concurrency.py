"""P2: a batch against a slow, replicated endpoint: makespan against the ideal.

256 one-image generations, 0.2 s per image, 16 replicas: the ideal makespan is
256 / 16 x 0.2 s = 3.2 s. The product client's ``generate_many`` (``max_concurrency=16``,
the replica count) is timed; the server's own ``in_flight_max`` says whether more than
16 generations ever ran or queued at once. SD 1.5 at 512x512 keeps the server's
rendering (a few ms, after the 0.2 s sleep) from adding its own CPU time to the figure.
A raw httpx thread pool of 16 is timed in the same run, for the practical floor.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from dagster_octoai.api.client import OctoAIClient

from ._common import TOKEN, Row, Settings, octoai_server

LATENCY_S = 0.2
REPLICAS = 16


def _requests(count: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"a lighthouse {i}", "engine": "sd", "width": 512, "height": 512, "seed": i}
        for i in range(count)
    ]


def _product(url: str, count: int, seen: dict[str, list[float]]) -> float:
    with OctoAIClient(TOKEN, base_url=url, max_concurrency=REPLICAS) as client:
        started = time.perf_counter()
        responses = client.generate_many(_requests(count))
        elapsed = time.perf_counter() - started
    assert len(responses) == count and all(len(r.images) == 1 for r in responses)
    # Where a makespan over the ideal goes: the server's own time per image (its
    # prediction_time_ms: the configured latency, or the render when that is longer)
    # against the time each call took as the client saw it.
    seen["server_s"].extend(r.prediction_time_ms / 1000 for r in responses)
    seen["call_s"].extend(r.call_info.elapsed_s for r in responses)
    return elapsed


def _raw_pool(url: str, count: int) -> float:
    limits = httpx.Limits(max_connections=REPLICAS, max_keepalive_connections=REPLICAS)
    with (
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, limits=limits, timeout=60
        ) as http,
        ThreadPoolExecutor(max_workers=REPLICAS) as pool,
    ):

        def one(body: dict[str, Any]) -> int:
            wire = {k: v for k, v in body.items() if k != "engine"}
            response = http.post("/generate/sd", json=wire)
            response.raise_for_status()
            return len(response.json()["images"])

        started = time.perf_counter()
        done = list(pool.map(one, _requests(count)))
        elapsed = time.perf_counter() - started
    assert sum(done) == count
    return elapsed


def run(settings: Settings) -> list[Row]:
    count = settings.n(256, 32)
    ideal = count / REPLICAS * LATENCY_S
    product: list[float] = []
    raw: list[float] = []
    in_flight_max = 0
    seen: dict[str, list[float]] = {"server_s": [], "call_s": []}
    queued_max = 0
    with octoai_server(latency_per_image_s=LATENCY_S, replicas=REPLICAS) as server:
        for _ in range(settings.reps):
            server.reset_stats()
            product.append(_product(server.url, count, seen))
            stats = server.stats()
            assert stats["paid_generations"] == count, stats["paid_generations"]
            in_flight_max = max(in_flight_max, stats["in_flight_max"])
            queued_max = max(queued_max, stats["queued_max"])
            server.reset_stats()
            raw.append(_raw_pool(server.url, count))
    return [
        Row(
            id="P2",
            scenario=(
                f"{count} generations, {LATENCY_S} s per image, {REPLICAS} replicas, "
                f"generate_many(max_concurrency={REPLICAS}) x {settings.reps} reps"
            ),
            baseline=f"ideal makespan {count} / {REPLICAS} x {LATENCY_S} s = {ideal:.2f} s",
            figure="makespan / ideal",
            unit="x",
            samples=[p / ideal for p in product],
            target=1.15,
            details={
                "makespan_s": [round(p, 3) for p in product],
                "ideal_s": ideal,
                "raw_httpx_pool_over_ideal": [round(r / ideal, 3) for r in raw],
                "server_in_flight_max": in_flight_max,
                "server_queued_max": queued_max,
                **{
                    f"{name}_{stat}": round(fn(values), 3)
                    for name, values in seen.items()
                    for stat, fn in (
                        ("median", statistics.median),
                        ("p90", lambda v: statistics.quantiles(v, n=10)[-1]),
                        ("max", max),
                    )
                },
            },
            checks={f"server in_flight_max {in_flight_max} <= {REPLICAS}": in_flight_max <= 16},
        )
    ]
