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

The other engines' cases (FLUX.1 [schnell] 1024x1024 4 steps, FLUX.1 [dev] and SD3 at
30 steps, SSD-1B 1024x1024 30 steps, SDXL with photo merge) run when the model directory
has their weights (``--models``; the full-size random models written here are SDXL and
SD 1.5 only) and are skipped, with a line saying so, when it has not. Eager cases run
before compiled ones. ``--only NAME,...`` picks cases by name (``sdxl``, ``sd``, ``ssd``,
``sd3``, ``flux-schnell``, ``flux-dev``, ``sdxl-photo-merge``); ``--budget-s S`` starts no
case once S seconds have passed and writes what was measured so far.

``--quick`` runs the same code on the tiny models (CPU allowed, 2 steps, the sdxl and sd
cases unless ``--only`` names others, one repetition, no warm-up, no compile): a smoke
test whose figures mean nothing. The suite runs it.
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

    engine: str  # sdxl, sd, ssd, sd3, flux-schnell, flux-dev
    width: int
    height: int
    steps: int
    batch: int
    compiled: bool
    photo_merge: bool = False

    @property
    def name(self) -> str:
        """What ``--only`` matches: the engine, or ``sdxl-photo-merge``."""
        return f"{self.engine}-photo-merge" if self.photo_merge else self.engine


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


CASE_NAMES = ("sdxl", "sd", "ssd", "sd3", "flux-schnell", "flux-dev", "sdxl-photo-merge")


def _cases(
    quick: bool, on_gpu: bool, steps: int | None = None, only: Sequence[str] = ()
) -> list[Case]:
    if quick:
        # The smoke run: every code path asked for (a batch among them), the fewest images.
        n = steps or 2
        cases = [
            Case("sdxl", 1024, 1024, n, 1, False),
            Case("sd", 512, 512, n, 2, False),
            Case("ssd", 1024, 1024, n, 1, False),
            Case("sd3", 1024, 1024, n, 1, False),
            Case("flux-schnell", 1024, 1024, n, 1, False),
            Case("flux-dev", 1024, 1024, n, 1, False),
            Case("sdxl", 1024, 1024, n, 1, False, photo_merge=True),
        ]
        return [c for c in cases if c.name in (only or ("sdxl", "sd"))]
    compiled = (False, True) if on_gpu else (False,)
    cases = [
        Case(engine, w, h, steps or 30, batch, comp)
        for comp in compiled  # eager first: a budget that runs out keeps those
        for engine, w, h in (("sdxl", 1024, 1024), ("sd", 512, 512))
        for batch in (1, 2, 4)
    ]
    cases[3:3] = [
        Case("flux-schnell", 1024, 1024, steps or 4, 1, False),
        Case("flux-dev", 1024, 1024, steps or 30, 1, False),
        Case("sd3", 1024, 1024, steps or 30, 1, False),
        Case("ssd", 1024, 1024, steps or 30, 1, False),
        Case("sdxl", 1024, 1024, steps or 30, 1, False, photo_merge=True),
    ]
    return [c for c in cases if not only or c.name in only]


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
    case: Case,
    pipe: Any,
    client: Any,
    device: str,
    reps: int,
    on_gpu: bool,
    warm_up: bool,
    ip_adapter: Path | None = None,
) -> Result:
    """One case: warm up, then ``reps`` interleaved direct and API generations."""
    import torch
    from diffusers import EulerDiscreteScheduler

    from dagster_octoai.api.models import Engine
    from dagster_octoai.server.backends.diffusers.photo_merge import photo_merge

    seeds = list(range(1, case.batch + 1))
    engine = Engine(case.engine)
    flux = engine.is_flux
    cfg = 3.5 if flux else 7.5
    body: dict[str, Any] = {
        "prompt": PROMPT,
        "steps": case.steps,
        "cfg_scale": cfg,
        "width": case.width,
        "height": case.height,
        "num_images": case.batch,
        "seed": seeds,
    }
    call: dict[str, Any] = {"guidance_scale": cfg}
    if not flux:
        body["negative_prompt"] = NEGATIVE
        call["negative_prompt"] = NEGATIVE
    if engine.refused_fields:  # FLUX, SD3: the prompt's T5 length, their own scheduler
        call["max_sequence_length"] = engine.token_limit
    else:
        body["sampler"] = "K_EULER"
    if case.engine == "sdxl":
        body["use_refiner"] = False
    words: list[list[Any]] = []
    if case.photo_merge:
        import base64
        import io

        from PIL import Image

        from dagster_octoai.testing.server import sample_image_b64

        reference = sample_image_b64((512, 512), "photo")
        body["transfer_images"] = {"sks": [reference]}
        words = [[Image.open(io.BytesIO(base64.b64decode(reference))).convert("RGB")]]

    def direct() -> float:
        # What a diffusers user writes: text in, PIL images out, a fresh scheduler.
        if engine.refused_fields:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        else:
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        _sync(torch)
        started = time.perf_counter()
        # Photo merge loads its adapters per call, as the server does per request.
        with photo_merge(pipe, ip_adapter, words) as merge:
            images = pipe(
                prompt=PROMPT,
                num_inference_steps=case.steps,
                width=case.width,
                height=case.height,
                num_images_per_prompt=case.batch,
                generator=generators,
                **call,
                **merge,
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
    only: Sequence[str] = (),
    budget_s: float | None = None,
    log: Any = print,
) -> list[Result]:
    """Measure every case on ``device`` with the models in ``models``.

    Cases whose engine the directory has no weights for are skipped; once ``budget_s``
    seconds have passed, no further case starts.
    """
    import httpx

    from dagster_octoai.api.models import Engine
    from dagster_octoai.server import ServerConfig
    from dagster_octoai.server.backends.diffusers.backend import DiffusersBackend
    from dagster_octoai.server.backends.diffusers.library import family_of

    started = time.monotonic()
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
        for case in _cases(quick, on_gpu, steps, only):
            if budget_s is not None and time.monotonic() - started > budget_s:
                log(f"--budget-s {budget_s:g} spent: {case.name} and later cases not run")
                break
            family = family_of(Engine(case.engine))
            ip_adapter = backend.library.ip_adapter(family) if case.photo_merge else None
            if family not in bases or (case.photo_merge and ip_adapter is None):
                log(f"{case.name}: skipped, {models} has no weights for it")
                continue
            if case.compiled and not compiled:
                for base in bases.values():
                    denoiser = (
                        base.pipe.unet if hasattr(base.pipe, "unet") else base.pipe.transformer
                    )
                    denoiser.compile(mode="max-autotune-no-cudagraphs")
                compiled = True
            pipe = bases[family].pipe
            result = _measure(case, pipe, client, device, reps, on_gpu, not quick, ip_adapter)
            summary = result.summary()
            log(
                f"{case.name} {case.width}x{case.height} {case.steps} steps batch {case.batch}"
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
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated cases to run, of: {', '.join(CASE_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no case after this many seconds; write what was measured",
    )
    args = parser.parse_args(argv)
    args.only = tuple(n for n in args.only.split(",") if n)
    unknown = sorted(set(args.only) - set(CASE_NAMES))
    if unknown:
        parser.error(f"--only: {', '.join(unknown)} not a case; allowed: {', '.join(CASE_NAMES)}")
    return args


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
        results = run(
            models,
            device,
            quick=args.quick,
            reps=args.reps,
            steps=args.steps,
            only=args.only,
            budget_s=args.budget_s,
        )
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
