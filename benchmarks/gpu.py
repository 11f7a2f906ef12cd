"""The GPU benchmark of the diffusers backend: ``python -m benchmarks.gpu`` (``make bench-gpu``).

One command on a CUDA machine, no download and no weights on disk: every engine's models
(UNet or transformer, VAE, text encoders) are built with random weights directly in GPU
memory from the real models' configs (:mod:`benchmarks.gpu_models`; speed does not depend
on the weights' values), one family at a time, into the server's pipelines; the
tokenizers, schedulers and layout come from a ``tiny-models`` directory written in
seconds. For each case (SDXL 1024x1024 30 steps batch 1 and 4, FLUX.1 [schnell]
1024x1024 4 steps, FLUX.1 [dev] and SD3 at their default 30 steps, SSD-1B 1024x1024 30
steps, SDXL with photo merge, SD 1.5 512x512 batch 1 and 4, Stable Video Diffusion 1.1
1024x576 25 frames 25 steps (a clip: ``images_per_s`` counts clips), then SDXL and SD 1.5
with ``torch.compile``) it measures, in the same process and interleaved:

- **direct**: the diffusers pipeline called as a diffusers user would (text in,
  images out), the baseline;
- **api**: the same loaded pipeline through the OctoAI API (``POST /generate/{engine}``
  over loopback HTTP to the bundled server, JSON and base64 JPEGs included).

Figures: p50/p95 latency of each, the server's overhead (api p50 / direct p50; target
<= 1.05), images per second per GPU, peak GPU memory, the seconds the models took to
build and their parameters. OctoAI published p50 2.77 s for SDXL 1024x1024 30 steps;
this project's goal is <= 1.5 s on an H100/H200-class GPU.

Eager cases run before compiled ones. ``--only NAME,...`` picks cases by name (``sdxl``,
``sd``, ``ssd``, ``sd3``, ``flux-schnell``, ``flux-dev``, ``sdxl-photo-merge``, ``svd``);
``--budget-s S`` (default 330 on a GPU, so that a default run ends within about 8
minutes on one H100: docs/benchmarks.md) starts no case once S seconds have passed and
writes what was measured so far.

``--quick`` runs the same code (models built in device memory, here from the directory's
tiny configs) on CPU: 2 steps, the sdxl and sd cases unless ``--only`` names others, one
repetition, no warm-up, no compile: a smoke test whose figures mean nothing. The suite
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Case", "Result", "main", "run"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-gpu.json"
TOKEN = "gpu-bench-token"
PROMPT = "a lighthouse on a cliff at dusk, dramatic light, highly detailed"
NEGATIVE = "blurry, low quality"
#: A default GPU run starts no case after this (its last case ends within 8 minutes:
#: docs/benchmarks.md has the estimate).
DEFAULT_BUDGET_S = 330.0


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
    #: Seconds to build the family's models in device memory (0: already built), parameters.
    build_s: float = 0.0
    parameters: int = 0

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
            "build_s": round(self.build_s, 2),
            "parameters": self.parameters,
            "reps": len(self.api_s),
        }


CASE_NAMES = ("sdxl", "sd", "ssd", "sd3", "flux-schnell", "flux-dev", "sdxl-photo-merge", "svd")


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
            Case("svd", 1024, 576, n, 1, False),
        ]
        return [c for c in cases if c.name in (only or ("sdxl", "sd"))]
    eager = [
        # One family after another (each is built once), the new rows early so
        # that a short --budget-s still measures them.
        Case("sdxl", 1024, 1024, steps or 30, 1, False),
        Case("sdxl", 1024, 1024, steps or 30, 1, False, photo_merge=True),
        Case("flux-schnell", 1024, 1024, steps or 4, 1, False),
        Case("flux-dev", 1024, 1024, steps or 30, 1, False),
        Case("sd3", 1024, 1024, steps or 30, 1, False),
        Case("ssd", 1024, 1024, steps or 30, 1, False),
        Case("sd", 512, 512, steps or 30, 1, False),
        Case("sd", 512, 512, steps or 30, 4, False),
        Case("sdxl", 1024, 1024, steps or 30, 4, False),
        # Stable Video Diffusion 1.1 at OctoAI's defaults: 1024x576, 25 frames, 25 steps.
        Case("svd", 1024, 576, steps or 25, 1, False),
    ]
    compiled = [
        Case("sdxl", 1024, 1024, steps or 30, 1, True),
        Case("sd", 512, 512, steps or 30, 1, True),
    ]
    cases = eager + (compiled if on_gpu else [])  # eager first: a spent budget keeps those
    return [c for c in cases if not only or c.name in only]


@contextlib.contextmanager
def _served(backend: Any, config: Any) -> Iterator[tuple[str, Any]]:
    """The backend behind the real HTTP front (uvicorn on loopback, in a thread): its URL
    and its app."""
    import threading

    from dagster_octoai.server.app import create_app
    from dagster_octoai.server.runner import _uvicorn_server, bind_socket

    sock = bind_socket("127.0.0.1", 0)
    app = create_app(config, backend=backend)
    server = _uvicorn_server(config, "warning", app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the benchmark's server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
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
    """One image case: warm up, then ``reps`` interleaved direct and API generations."""
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

    def api() -> None:
        r = client.post(f"/generate/{case.engine}", json=body)
        r.raise_for_status()
        assert len(r.json()["images"]) == case.batch

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

    return _timed(case, direct, api, pipe, reps, on_gpu, warm_up)


def _timed(
    case: Case,
    direct: Callable[[], float],
    request: Callable[[], Any],
    pipe: Any,
    reps: int,
    on_gpu: bool,
    warm_up: bool,
) -> Result:
    """Warm up, then ``reps`` interleaved direct and API calls (``request``: one API call)."""
    import torch

    # The server must run the models built for this case, not the directory's: count the
    # denoiser's calls (eager only: a hook inside a compiled module would change it).
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    steps_run = [0]

    def count(*_: Any) -> None:
        steps_run[0] += 1

    def api() -> float:
        before = steps_run[0]
        started = time.perf_counter()
        request()
        elapsed = time.perf_counter() - started
        if not case.compiled and steps_run[0] == before:
            raise RuntimeError(f"{case.name}: the server did not run the models built for it")
        return elapsed

    hook = None if case.compiled else denoiser.register_forward_pre_hook(count)
    try:
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
    finally:
        if hook is not None:
            hook.remove()
    if on_gpu:
        result.peak_gpu_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def _measure_video(
    case: Case, pipe: Any, client: Any, device: str, reps: int, on_gpu: bool, warm_up: bool
) -> Result:
    """The SVD case: one clip of the model's frames, direct against ``POST /generate/svd``.

    Direct is what a diffusers user writes: the picture in, ``StableVideoDiffusionPipeline``
    with its defaults (which are OctoAI's: 7 fps, motion bucket 127, noise augmentation
    0.02, guidance 1 to 3), the frames encoded to H.264 MP4 (PyAV, as the server does).
    """
    import base64
    import io

    import torch
    from PIL import Image

    from dagster_octoai.api.video import DEFAULT_CRF
    from dagster_octoai.server.mp4 import encode_mp4
    from dagster_octoai.testing.server import sample_image_b64

    picture = sample_image_b64((case.width, case.height), "photo")
    still = Image.open(io.BytesIO(base64.b64decode(picture))).convert("RGB")
    frames = int(pipe.unet.config.num_frames)
    body = {
        "image": picture,
        "steps": case.steps,
        "width": case.width,
        "height": case.height,
        "seed": 1,
    }

    def direct() -> float:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        generator = torch.Generator(device="cpu").manual_seed(1)
        _sync(torch)
        started = time.perf_counter()
        with torch.inference_mode():
            clip = pipe(
                still,
                height=case.height,
                width=case.width,
                num_frames=frames,
                num_inference_steps=case.steps,
                decode_chunk_size=frames,
                generator=generator,
            ).frames[0]
        _sync(torch)
        assert len(encode_mp4(clip, fps=7, crf=DEFAULT_CRF)) > 0
        return time.perf_counter() - started

    def api() -> None:
        r = client.post("/generate/svd", json=body)
        r.raise_for_status()
        assert len(r.json()["videos"]) == case.batch

    return _timed(case, direct, api, pipe, reps, on_gpu, warm_up)


class _Models:
    """The family whose models are built in device memory now; one family at a time."""

    def __init__(self, backend: Any, device: str, published: bool) -> None:
        self.bases = backend._devices[0].bases
        self.skeletons = {family: ckpt.pipe for family, ckpt in self.bases.items()}
        self.dtypes = (backend._devices[0].dtype, backend._devices[0].flow_dtype)
        self.library = backend.library
        self.device = device
        self.published = published
        self.held: tuple[str, bool] | None = None

    def add_video(self, app: Any) -> None:
        """The server's SVD renderer (from the directory's ``svd/base``), built like a family.

        Its pipeline is the one ``POST /generate/svd`` (of ``app``) renders with, so the
        models built for the case go where the server's requests use them.
        """
        route = next((r for r in app.routes if getattr(r, "path", "") == "/generate/svd"), None)
        renderer = getattr(getattr(route, "endpoint", None), "__self__", None)
        renderer = getattr(renderer, "renderer", None)
        if renderer is not None and hasattr(renderer, "pipe"):
            self.bases["svd"] = renderer
            self.skeletons["svd"] = renderer.pipe

    def use(self, family: Any, compiled: bool) -> tuple[Any, float, int]:
        """The family's pipeline (built now unless held already), its build seconds, size."""
        from dagster_octoai.server.backends.diffusers.library import FLOW_FAMILIES

        from .gpu_models import build_in_memory, free, parameters

        ckpt = self.bases[family]
        if self.held == (family, compiled):
            return ckpt.pipe, 0.0, parameters(ckpt.pipe)
        self.release()
        started = time.perf_counter()
        dtype = self.dtypes[1] if family in FLOW_FAMILIES else self.dtypes[0]  # svd: [0]
        pipe = build_in_memory(
            self.skeletons[family], family, self.device, dtype, published=self.published
        )
        if compiled:
            (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).compile()
        ckpt.pipe = pipe  # what the server's requests use from now on
        self.held = (family, compiled)
        free(self.device)
        return pipe, time.perf_counter() - started, parameters(pipe)

    def ip_adapter(self, family: Any, pipe: Any) -> Path | None:
        """The photo merge adapter; at full size, one written for the full-size UNet."""
        from dagster_octoai.server.backends.diffusers.photo_merge import write_tiny_ip_adapter

        if self.published:
            # The directory's adapter fits its tiny UNet: write one (random, a few hundred
            # MB; its image encoder stays tiny) for the real UNet's attention sizes, first
            # by name so that the server and the direct side both load it.
            folder = self.library.folder(family) / "ip_adapters" / "0-gpu-benchmark"
            if not folder.exists():
                write_tiny_ip_adapter(pipe.unet, folder, seed=60)
        return self.library.ip_adapter(family)  # type: ignore[no-any-return]

    def release(self) -> None:
        from .gpu_models import free

        if self.held is not None:
            family = self.held[0]
            self.bases[family].pipe = self.skeletons[family]
            self.held = None
        free(self.device)


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
    """Measure every case on ``device``.

    ``models`` is a ``tiny-models`` directory: its tokenizers, schedulers and layout. Each
    case's models are built in device memory: the real architectures, or with ``quick``
    the directory's own tiny ones. Cases whose family the directory lacks are skipped;
    once ``budget_s`` seconds have passed, no further case starts.
    """
    import httpx

    from dagster_octoai.api.models import Engine
    from dagster_octoai.server import ServerConfig
    from dagster_octoai.server.backends.diffusers.backend import DiffusersBackend
    from dagster_octoai.server.backends.diffusers.library import family_of

    started = time.monotonic()
    on_gpu = device.startswith("cuda")
    reps = reps or (1 if quick else 3)
    config = ServerConfig(token=TOKEN, backend="diffusers", models=str(models), device=(device,))
    backend = DiffusersBackend.from_config(config)
    built = _Models(backend, device, published=not quick)
    results: list[Result] = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with (
            _served(backend, config) as (url, app),
            httpx.Client(base_url=url, headers=headers, timeout=3600) as client,
        ):
            built.add_video(app)
            for case in _cases(quick, on_gpu, steps, only):
                if budget_s is not None and time.monotonic() - started > budget_s:
                    log(f"--budget-s {budget_s:g} spent: {case.name} and later cases not run")
                    break
                family = "svd" if case.engine == "svd" else family_of(Engine(case.engine))
                if family not in built.bases:
                    log(f"{case.name}: skipped, {models} has no {family} folder")
                    continue
                pipe = None  # the previous family's models go before this one's are built
                pipe, build_s, size = built.use(family, case.compiled)
                ip_adapter = built.ip_adapter(family, pipe) if case.photo_merge else None
                if case.photo_merge and ip_adapter is None:
                    log(f"{case.name}: skipped, {models} has no IP-Adapter for {family}")
                    continue
                if family == "svd":
                    result = _measure_video(case, pipe, client, device, reps, on_gpu, not quick)
                else:
                    result = _measure(
                        case, pipe, client, device, reps, on_gpu, not quick, ip_adapter
                    )
                result.build_s, result.parameters = build_s, size
                summary = result.summary()
                log(
                    f"{case.name} {case.width}x{case.height} {case.steps} steps batch {case.batch}"
                    f"{' compiled' if case.compiled else ''}: {size / 1e6:,.0f} M parameters built "
                    f"in {build_s:.1f} s; direct p50 {summary['direct_p50_s']} s, "
                    f"api p50 {summary['api_p50_s']} s (x{summary['server_overhead']}), "
                    f"{summary['images_per_s']} images/s, peak {summary['peak_gpu_gib']} GiB"
                )
                results.append(result)
    finally:
        built.release()
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
        help="a tiny-models directory for the layout, tokenizers and schedulers (default: "
        "written to a temp dir); a full run adds a full-size photo merge adapter to it",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="measured repetitions per case (default: 3)"
    )
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
        help="start no case after this many seconds; write what was measured "
        f"(default: {DEFAULT_BUDGET_S:g} on a GPU, none with --quick)",
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
    budget_s = args.budget_s if args.budget_s is not None or args.quick else DEFAULT_BUDGET_S
    with tempfile.TemporaryDirectory(prefix="octoai-gpu-bench-") as tmp:
        models = args.models
        if models is None:
            models = Path(tmp) / "models"
            started = time.perf_counter()
            # Layout, tokenizers and schedulers only: the weights are built in device memory.
            write_models(models, scale="tiny")
            print(f"wrote the tiny model directory in {time.perf_counter() - started:.0f} s")
        results = run(
            models,
            device,
            quick=args.quick,
            reps=args.reps,
            steps=args.steps,
            only=args.only,
            budget_s=budget_s,
        )
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    data = {
        "quick": args.quick,
        "device": device,
        "gpu": gpu,
        "torch": torch.__version__,
        "weights": "random, built in device memory from the real configs"
        if not args.quick
        else "random, tiny configs (a smoke run: the figures mean nothing)",
        "budget_s": budget_s,
        "targets": {"server_overhead_max": 1.05, "sdxl_1024_30_steps_p50_s_goal": 1.5},
        "results": [r.summary() for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=2) + "\n")
    print(f"figures in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
