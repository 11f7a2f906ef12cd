"""``POST /generate/svd``: Stable Video Diffusion, an image in and MP4 clips out.

The route shares the image routes' machinery: bearer auth, the rate limit, the body
limits, the replica queue (sync requests and async jobs wait in the same
:class:`~dagster_octoai.server.jobs.ReplicaPool`), the job store and its poll and fetch
routes, and the seeds' semantics (fixed ones as asked, consecutive ones from one int seed,
random ones otherwise). What renders a clip is a :class:`VideoRenderer`: placeholder clips
on the placeholder backend, ``StableVideoDiffusionPipeline`` on the diffusers backend when
its model directory has ``svd/base``; without one the route answers 404 unknown engine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import warnings
from typing import Any, Protocol

from PIL import Image
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..api.images import image_size
from ..api.video import SVD_ENGINE, VideoGenerationRequest
from .app import (
    ASYNC_HEADER,
    GenerationRefused,
    ServerState,
    _base_url,
    _message,
    _pydantic_detail,
    _validation_response,
    read_json_body,
)
from .backends import Backend
from .jobqueue import JobControl
from .seeds import choose_seeds
from .stats import RequestRecord

__all__ = ["VideoRenderer", "video_renderer", "video_routes"]


class VideoRenderer(Protocol):
    """Turns a validated video request and its seeds into one MP4 per seed (a worker thread)."""

    name: str

    def render_video(self, request: VideoGenerationRequest, seeds: list[int]) -> list[bytes]: ...


def video_renderer(backend: Backend) -> VideoRenderer | None:
    """What renders videos on ``backend``, or None when it serves no ``svd``."""
    if backend.name == "placeholder":
        from .backends.placeholder.video import PlaceholderVideoRenderer

        return PlaceholderVideoRenderer()
    if backend.name == "diffusers":
        from .backends.diffusers.svd import SvdRenderer

        return SvdRenderer.for_backend(backend)
    return None


class _VideoRoute:
    """The route's handler, bound to its server's state and renderer."""

    def __init__(self, state: ServerState, renderer: VideoRenderer | None) -> None:
        self.state = state
        self.renderer = renderer

    async def handle(self, request: Request) -> Response:
        state = self.state
        caller = state.gate.api_caller(request)
        if isinstance(caller, Response):
            return caller
        if self.renderer is None:
            return _message(
                404,
                f"Unknown engine {SVD_ENGINE!r}: this server has no Stable Video Diffusion "
                "model (the diffusers backend needs svd/base in its model directory).",
            )
        if (limited := state.rate_limit_error()) is not None:
            return limited
        is_async = request.headers.get(ASYNC_HEADER, "").strip().lower() in ("1", "true")
        read = await self._validated(request, is_async)
        if isinstance(read, Response):
            return read
        req, raw, idempotency = read
        record: RequestRecord | None = request.scope.get("octoai.record")
        if is_async:
            try:
                response_id, fresh = await state.submit_job(
                    SVD_ENGINE, req.summary(), caller, False, raw, idempotency
                )
            except GenerationRefused as refused:
                return refused.response()
            # A repeat (the same Idempotency-Key) is the first job again: nothing new to count.
            if fresh:
                state.stats.async_submitted += 1
            if record is not None:
                record.engine, record.response_id = SVD_ENGINE, response_id
            base = _base_url(request, state)
            return JSONResponse(
                {"response_id": response_id, "poll_url": f"{base}/v1/requests/{response_id}"},
                status_code=201,
            )
        try:
            payload, seeds = await self._generate(req)
        except GenerationRefused as refused:
            return refused.response()
        if record is not None:
            record.engine, record.images, record.seeds = SVD_ENGINE, len(seeds), seeds
        return Response(payload, media_type="application/json")

    async def _validated(
        self, request: Request, is_async: bool
    ) -> tuple[VideoGenerationRequest, bytes, tuple[str, str] | None] | Response:
        """The request, its raw body and (Idempotency-Key, body digest), or the 422."""
        state = self.state
        read = await read_json_body(request, state, SVD_ENGINE, is_async)
        if isinstance(read, Response):
            return read
        body, raw, idempotency = read
        try:
            req = VideoGenerationRequest.from_wire(body)
        except ValidationError as exc:
            state.stats.validation_errors += 1
            return _validation_response(_pydantic_detail(exc))
        problem = await asyncio.get_running_loop().run_in_executor(
            state.executor, _image_problem, req, state.config.max_input_image_scale
        )
        if problem is not None:
            state.stats.validation_errors += 1
            return _validation_response(
                [{"loc": ["body", "image"], "msg": problem, "type": "value_error"}]
            )
        return req, raw, idempotency

    async def _generate(self, req: VideoGenerationRequest) -> tuple[bytes, list[int]]:
        state = self.state
        state.refuse_if_queue_full()
        async with state.pool:
            return await self._render(req)

    async def _render(self, req: VideoGenerationRequest) -> tuple[bytes, list[int]]:
        assert self.renderer is not None
        renderer = self.renderer
        started = time.perf_counter()
        seeds = choose_seeds(req.seed, req.video_count, self.state.seed_rng)
        clips = await asyncio.get_running_loop().run_in_executor(
            self.state.executor, renderer.render_video, req, seeds
        )
        self.state.stats.record_generation(SVD_ENGINE, len(clips), 0)
        body: dict[str, Any] = {
            "videos": [
                {
                    "video": base64.b64encode(clip).decode("ascii"),
                    "seed": seed,
                    "removed_for_safety": False,
                    "safety_score": 0.0,
                }
                for clip, seed in zip(clips, seeds, strict=True)
            ],
            "prediction_time_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        return json.dumps(body, separators=(",", ":")).encode(), seeds

    async def render_job(self, raw: bytes, control: JobControl) -> bytes:
        """An async job's answer from its stored body (the job queue holds the replica)."""
        req = VideoGenerationRequest.from_wire(json.loads(raw))
        body, _ = await self._render(req)
        return body


def _image_problem(req: VideoGenerationRequest, scale: float) -> str | None:
    """Why the input image cannot be animated, or None.

    As for images' inputs, a picture over ``max_input_image_scale`` squared times the
    output's pixels is refused before it is decoded; the rest is decoded in full here, so a
    truncated file is the client's 422 and not a failed render.
    """
    try:
        width, height = image_size(req.image_bytes)
        out_w, out_h = req.size
    except ValueError as exc:
        return f"the picture cannot be read ({exc})"
    max_pixels = int(out_w * out_h * scale * scale)
    if width * height > max_pixels:
        return f"{width}x{height} has too many pixels; at most {max_pixels:,}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(req.image_bytes)) as im:
                im.load()
    except Exception as exc:
        return f"the picture cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def video_routes(state: ServerState) -> list[Route]:
    """The video route of a server; its renderer (and any model) is loaded here, once.

    Async video jobs go to the server's durable job queue, which renders them here.
    """
    route = _VideoRoute(state, state.video_renderer())
    if route.renderer is not None:
        state.jobs.renderers[SVD_ENGINE] = route.render_job
    return [
        Route(
            f"/generate/{SVD_ENGINE}",
            route.handle,
            methods=["POST"],
        )
    ]
