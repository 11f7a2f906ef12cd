"""Throughput of the local OctoAI server in instant mode, with the client in another process.

The server runs as ``python -m dagster_octoai.server`` (``LocalOctoAIServer(mode="process")``)
with no latency and enough replicas never to queue; this process keeps ``concurrency``
requests in flight with httpx for ``duration`` seconds per scenario and prints
requests/second, images/second and latency percentiles, plus how long the server takes
to start. No assertions: the figures are for reading, machines differ.

Run: ``.venv/bin/python -m benchmarks.server_throughput [--duration 5] [--concurrency 1 4 16]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from dagster_octoai.server import LocalOctoAIServer, ServerConfig

TOKEN = "bench-token"


@dataclass(frozen=True)
class Scenario:
    name: str
    engine: str
    body: dict[str, Any]
    detail: float = 0.0


SCENARIOS = (
    Scenario("sd 512x512 jpeg, fixed seed", "sd", {"prompt": "a lighthouse", "seed": 1}),
    Scenario("sd 512x512 jpeg, random seed", "sd", {"prompt": "a lighthouse"}),
    Scenario(
        "sd 512x512 png, random seed", "sd", {"prompt": "a lighthouse", "image_encoding": "png"}
    ),
    Scenario("sdxl 1024x1024 jpeg, random seed", "sdxl", {"prompt": "a lighthouse"}),
    Scenario("sdxl 1024x1024 jpeg ~1.5 MB (detail 0.7)", "sdxl", {"prompt": "a lighthouse"}, 0.7),
)


@dataclass
class Result:
    scenario: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    bytes_received: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _hammer(url: str, scenario: Scenario, concurrency: int, duration: float) -> Result:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    latencies: list[float] = []
    errors = 0
    received = 0
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=60
    ) as client:
        # Warm-up: connections open, caches primed, outside the measured window.
        await asyncio.gather(
            *(
                client.post(f"/generate/{scenario.engine}", json=scenario.body)
                for _ in range(concurrency)
            )
        )
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors, received
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                r = await client.post(f"/generate/{scenario.engine}", json=scenario.body)
                latencies.append((time.perf_counter() - started) * 1000)
                received += len(r.content)
                if r.status_code != 200:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Result(scenario.name, concurrency, len(latencies), errors, elapsed, latencies, received)


def _startup_times(reps: int) -> dict[str, list[float]]:
    """Seconds until /healthcheck answers: a fresh interpreter for the cold figures."""
    times: dict[str, list[float]] = {"process": [], "thread (cold interpreter)": []}
    config = ServerConfig(token=TOKEN)
    for _ in range(reps):
        with LocalOctoAIServer(config, mode="process") as srv:
            assert srv.startup_s is not None
            times["process"].append(srv.startup_s)
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import time; t = time.perf_counter()\n"
                "from dagster_octoai.server import LocalOctoAIServer\n"
                "with LocalOctoAIServer() as s: pass\n"
                "print(time.perf_counter() - t)",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        times["thread (cold interpreter)"].append(float(probe.stdout.strip()))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per measurement (default 5)"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests in flight"
    )
    parser.add_argument(
        "--startup-reps", type=int, default=3, help="server starts to time (default 3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 0.5 s, concurrency 4, 1 start"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.concurrency, args.startup_reps = 0.5, [4], 1

    startup = _startup_times(args.startup_reps)
    print("Server startup (s, until /healthcheck answers)")
    for mode, samples in startup.items():
        print(
            f"  {mode:<28} median {statistics.median(samples):.3f}  min {min(samples):.3f}  max {max(samples):.3f}"
        )
    print()

    config = ServerConfig(token=TOKEN, latency_per_image_s=0.0, replicas=1024)
    rows: list[Result] = []
    with LocalOctoAIServer(config, mode="process") as srv:
        for scenario in SCENARIOS:
            srv.configure(detail=scenario.detail)
            for concurrency in args.concurrency:
                rows.append(asyncio.run(_hammer(srv.url, scenario, concurrency, args.duration)))
        stats = srv.stats()

    header = f"{'scenario':<42} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'MB/s':>7} {'errors':>6}"
    print("Instant mode, client in this process, server in another")
    print(header)
    print("-" * len(header))
    for r in rows:
        mb_s = r.bytes_received / r.seconds / 1e6
        print(
            f"{r.scenario:<42} {r.concurrency:>4} {r.rps:>8.1f} {r.percentile(0.5):>8.1f} "
            f"{r.percentile(0.95):>8.1f} {mb_s:>7.1f} {r.errors:>6}"
        )
    print()
    print(
        f"server: {stats['paid_generations']} images rendered, in_flight_max {stats['in_flight_max']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
