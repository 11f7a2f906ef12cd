"""The GPU benchmark of the diffusers backend: ``python -m benchmarks.gpu`` (``make bench-gpu``).

One command on a CUDA machine, no download: it writes full-size SDXL- and SD
1.5-architecture models with random weights (speed does not depend on the weights'
values; ``dagster-octoai tiny-models --scale full``), then for each case (SDXL
1024x1024 and SD 1.5 512x512, 30 steps, batch 1/2/4, eager and ``torch.compile``)
measures, in the same process and interleaved:

- **direct**: the diffusers pipeline called as a diffusers user would (text in,
  images out), the baseline;
- **api**: the same loaded pipeline through the OctoAI API (``POST /generate/{engine}``
  over loopback HTTP to the bundled server, JSON and base64 JPEGs included).

Figures: p50/p95 latency of each, the server's overhead (api p50 / direct p50; target
<= 1.05), images per second per GPU, peak GPU memory. OctoAI published p50 2.77 s for
SDXL 1024x1024 30 steps; this project's goal is <= 1.5 s on an H100/H200-class GPU.

``--quick`` runs the same code on the tiny models (CPU allowed, 2 steps, two cases, one
repetition, no warm-up, no compile): a smoke test whose figures mean nothing. The suite
runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Case", "Result", "main", "run"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-gpu.json"
TOKEN = "gpu-bench-token"
PROMPT = "a lighthouse on a cliff at dusk, dramatic light, highly detailed"
NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    engine: str  # "sdxl" or "sd"
    width: int
    height: int
    steps: int
    batch: int
    compiled: bool


@dataclass
class Result:
    """One case's figures (seconds, images/s, GiB)."""

    case: Case
    direct_s: list[float] = field(default_factory=list)
    api_s: list[float] = field(default_factory=list)
    peak_gpu_gib: float | None = None

    @staticmethod
    def _p(samples: list[float], q: float) -> float:
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> dict[str, Any]:
        direct_p50 = statistics.median(self.direct_s)
        api_p50 = statistics.median(self.api_s)
        return {
            **asdict(self.case),
            "direct_p50_s": round(direct_p50, 4),
            "direct_p95_s": round(self._p(self.direct_s, 0.95), 4),
            "api_p50_s": round(api_p50, 4),
            "api_p95_s": round(self._p(self.api_s, 0.95), 4),
            "server_overhead": round(api_p50 / direct_p50, 4),
            "images_per_s": round(self.case.batch / api_p50, 3),
            "peak_gpu_gib": self.peak_gpu_gib,
            "reps": len(self.api_s),
        }


def _cases(quick: bool, on_gpu: bool, steps: int | None = None) -> list[Case]:
    if quick:
        # The smoke run: every code path (both engines, a batch), the fewest images.
        n = steps or 2
        return [Case("sdxl", 1024, 1024, n, 1, False), Case("sd", 512, 512, n, 2, False)]
    compiled = (False, True) if on_gpu else (False,)
    return [
        Case(engine, w, h, steps or 30, batch, comp)
        for comp in compiled
        for engine, w, h in (("sdxl", 1024, 1024), ("sd", 512, 512))
        for batch in (1, 2, 4)
    ]


@contextlib.contextmanager
def _served(backend: Any, config: Any) -> Iterator[str]:
    """The backend behind the real HTTP front (uvicorn on loopback, in a thread)."""
    import threading

    from dagster_octoai.server.app import create_app
    from dagster_octoai.server.runner import _uvicorn_server, bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = _uvicorn_server(config, "warning", create_app(config, backend=backend))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the benchmark's server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _sync(torch: Any) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _measure(
    case: Case, pipe: Any, client: Any, device: str, reps: int, on_gpu: bool, warm_up: bool
) -> Result:
    """One case: warm up, then ``reps`` interleaved direct and API generations."""
    import torch
    from diffusers import EulerDiscreteScheduler

    seeds = list(range(1, case.batch + 1))
    body = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "steps": case.steps,
        "cfg_scale": 7.5,
        "width": case.width,
        "height": case.height,
        "num_images": case.batch,
        "seed": seeds,
        "sampler": "K_EULER",
        **({"use_refiner": False} if case.engine == "sdxl" else {}),
    }

    def direct() -> float:
        # What a diffusers user writes: text in, PIL images out, a fresh scheduler.
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        _sync(torch)
        started = time.perf_counter()
        images = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=case.steps,
            guidance_scale=7.5,
            width=case.width,
            height=case.height,
            num_images_per_prompt=case.batch,
            generator=generators,
        ).images
        _sync(torch)
        assert len(images) == case.batch
        return time.perf_counter() - started

    def api() -> float:
        started = time.perf_counter()
        r = client.post(f"/generate/{case.engine}", json=body)
        elapsed = time.perf_counter() - started
        r.raise_for_status()
        assert len(r.json()["images"]) == case.batch
        return elapsed

    if warm_up:
        # Warm-up (and, when compiled, the compilation) is not measured.
        direct()
        api()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    result = Result(case)
    for i in range(reps):
        # Interleaved, alternating which goes first: drift hits both alike.
        order = (direct, api) if i % 2 == 0 else (api, direct)
        for fn in order:
            (result.direct_s if fn is direct else result.api_s).append(fn())
    if on_gpu:
        result.peak_gpu_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def run(
    models: Path,
    device: str,
    *,
    quick: bool = False,
    reps: int | None = None,
    steps: int | None = None,
    log: Any = print,
) -> list[Result]:
    """Measure every case on ``device`` with the models in ``models``."""
    import httpx

    from dagster_octoai.server import ServerConfig
    from dagster_octoai.server.backends.diffusers.backend import DiffusersBackend

    on_gpu = device.startswith("cuda")
    reps = reps or (1 if quick else 10)
    config = ServerConfig(token=TOKEN, backend="diffusers", models=str(models), device=(device,))
    backend = DiffusersBackend.from_config(config)
    results: list[Result] = []
    compiled = False
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with (
        _served(backend, config) as url,
        httpx.Client(base_url=url, headers=headers, timeout=3600) as client,
    ):
        bases = backend._devices[0].bases
        for case in _cases(quick, on_gpu, steps):
            if case.compiled and not compiled:
                for base in bases.values():
                    base.pipe.unet.compile(mode="max-autotune-no-cudagraphs")
                compiled = True
            pipe = bases["sdxl" if case.engine == "sdxl" else "sd15"].pipe
            result = _measure(case, pipe, client, device, reps, on_gpu, warm_up=not quick)
            summary = result.summary()
            log(
                f"{case.engine} {case.width}x{case.height} {case.steps} steps batch {case.batch}"
                f"{' compiled' if case.compiled else ''}: direct p50 {summary['direct_p50_s']} s, "
                f"api p50 {summary['api_p50_s']} s (x{summary['server_overhead']}), "
                f"{summary['images_per_s']} images/s"
            )
            results.append(result)
    backend.close()
    return results


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 steps: a smoke run")
    parser.add_argument(
        "--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)"
    )
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help="an existing model directory (default: write random-weight ones to a temp dir)",
    )
    parser.add_argument("--reps", type=int, default=None, help="measured repetitions per case")
    parser.add_argument(
        "--steps", type=int, default=None, help="diffusion steps (default: 30; quick: 2)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON figures")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write the figures as JSON (and print them)."""
    args = _parse(argv)
    import torch

    from dagster_octoai.server.backends.diffusers.tiny import write_models

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.quick and not device.startswith("cuda"):
        print(
            "python -m benchmarks.gpu: the full benchmark needs a CUDA GPU "
            f"(torch {torch.__version__} sees none); --quick runs the smoke test on CPU",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="octoai-gpu-bench-") as tmp:
        models = args.models
        if models is None:
            models = Path(tmp) / "models"
            started = time.perf_counter()
            write_models(models, scale="tiny" if args.quick else "full")
            print(f"wrote random-weight models in {time.perf_counter() - started:.0f} s")
        results = run(models, device, quick=args.quick, reps=args.reps, steps=args.steps)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    data = {
        "quick": args.quick,
        "device": device,
        "gpu": gpu,
        "torch": torch.__version__,
        "targets": {"server_overhead_max": 1.05, "sdxl_1024_30_steps_p50_s_goal": 1.5},
        "results": [r.summary() for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=2) + "\n")
    print(f"figures in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
