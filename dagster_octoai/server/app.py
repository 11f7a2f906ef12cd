"""The ASGI application: OctoAI's image routes, the playground, and ``/_local`` controls.

Request path, outermost first: the gateway (``X-User-Request-ID``, security headers, the
request log, injected faults), the body limits (size and time, before a route reads a
byte: :mod:`~dagster_octoai.server.limits`), then per route: bearer auth
(:mod:`~dagster_octoai.server.security`), rate limit, JSON parsing and validation with
the same :class:`~dagster_octoai.api.models.ImageGenerationRequest` the client uses, the
input image limits, the policy check, and the generation on a replica (sync) or in the
background (async). The ``/_local`` controls exist only when ``control_routes`` is on, and
answer only the admin token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import time
import uuid
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..api.models import Engine, ImageGenerationRequest, JobStatus, PromptTooLongWarning
from .backends import Backend, load_backend
from .budget import over_budget
from .config import BACKEND_FIELDS, RUNTIME_FIXED, ServerConfig
from .jobqueue import (
    CURRENT_CONTROL,
    IdempotencyConflict,
    JobAnswer,
    JobCancelled,
    JobControl,
    JobQueue,
    QueueFull,
    ShuttingDown,
)
from .jobs import ReplicaPool
from .jobstore import body_digest, open_job_store
from .limits import BodyLimits, oversized_images, parse_json_body, undecodable_images
from .openapi import openapi_document
from .security import NO_STORE, SECURITY_HEADERS, Caller, Gatekeeper
from .seeds import choose_seeds
from .stats import CURRENT_RECORD, RequestRecord, ServerStats

if TYPE_CHECKING:
    from .video import VideoRenderer

__all__ = ["GenerationRefused", "ServerState", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

POLICY_MESSAGE = "This request violates our Acceptable Use Policy."
ASYNC_HEADER = "x-octoai-async"
IDEMPOTENCY_HEADER = "idempotency-key"
#: How often a sync generation checks that its client is still there, seconds.
_DISCONNECT_CHECK_S = 0.25
#: Seeds the server chooses are below this (the service's seed range).
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")

_ROUTES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^/generate/[^/]+/?$"), "/generate/{engine}"),
    (re.compile(r"^/v1/requests/[^/]+/?$"), "/v1/requests/{response_id}"),
    (re.compile(r"^/v1/responses/[^/]+/?$"), "/v1/responses/{response_id}"),
)


_STATIC_ROUTES = frozenset({"/healthcheck", "/openapi.json", "/", "/playground"})


def _route_of(path: str) -> str:
    """The route template of a path: bounded keys for the stats, whatever is requested."""
    for pattern, name in _ROUTES:
        if pattern.match(path):
            return name
    if path in _STATIC_ROUTES or path.startswith("/_local/"):
        return path
    if path.startswith("/playground/"):
        return "/playground/{file}"
    return "(unrouted)"


def _app_path(scope: Scope) -> str:
    """The path below the app's mount point (Ray Serve's route prefix is the root path)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _message(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status, headers=headers)


class GenerationRefused(Exception):
    """A deployment could not generate: every replica busy past the queue bound (429), a
    replica lost (503), or what the backend cannot serve (422, with ``detail``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after_s: int | None = None,
        detail: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        self.detail = detail

    def response(self) -> JSONResponse:
        if self.detail is not None:
            return _validation_response(self.detail)
        headers = None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        return _message(self.status, self.message, headers)


class ServerState:
    """Everything one app instance knows: config, backend, counters, replicas, jobs, random sources.

    Async jobs live in the job store the configuration names and run through
    :class:`~.jobqueue.JobQueue`; :meth:`generate` (and ``_render_job``) is where a
    deployment differs: here on this process's replicas, on Ray Serve on the generator
    replicas (:mod:`dagster_octoai.server.ray_serve`).
    """

    #: Which replica of a deployment this app is (``X-OctoAI-Frontend``); None alone.
    replica_name: str | None = None

    def __init__(
        self,
        config: ServerConfig,
        backend: Backend | None = None,
        *,
        owner_key: bytes | None = None,
    ) -> None:
        self.config = config
        # What renders the images; the rest of this module is the same for every backend.
        self.backend = backend if backend is not None else load_backend(config)
        # Durable unless the configuration names no store (then in memory, for tests).
        job_store = open_job_store(
            state_dir=config.state_dir,
            jobs_url=config.jobs_url,
            endpoint_url=config.jobs_endpoint_url,
        )
        # Owner hashes come from the store's key, so that a restarted server (or another
        # frontend on the store) knows whose each stored job is.
        self.owner_key = owner_key or job_store.owner_key
        self.gate = Gatekeeper(config, self.owner_key)
        self.stats = ServerStats()
        self.pool = ReplicaPool(self._replicas, self.stats.observe_pool)
        self.jobs = JobQueue(
            job_store,
            config=lambda: self.config,
            pool=self.pool,
            render=self._render_job,
            stats=self.stats,
        )
        self.fault_rng = random.Random(config.faults.seed)
        # Seeds for unseeded requests are random, as on the hosted service.
        self.seed_rng = random.Random()
        self.rate_window: deque[float] = deque()
        # A backend's render blocks its thread for the whole generation: one per replica.
        workers = max(4, self.backend.replicas or 0)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="octoai-render")
        # Checking a request (images, asset names) never waits behind a generation.
        self.checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="octoai-check")

    def _replicas(self) -> int:
        # A backend with devices runs one generation per device; the rest queue here.
        return self.backend.replicas or self.config.replicas

    async def snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot(
            in_flight=self.pool.in_flight,
            queued=self.pool.queued,
            jobs_by_status=await self.job_counts(),
        )

    async def reconfigure(self, changes: dict[str, Any]) -> ServerConfig:
        """Apply runtime changes (``ValueError`` for settings fixed at start-up)."""
        frozen = sorted(RUNTIME_FIXED & set(changes))
        if frozen:
            raise ValueError(
                f"{', '.join(frozen)}: fixed at start-up; restart the server to change it"
            )
        old = self.config
        if fixed := sorted(set(changes) & set(BACKEND_FIELDS)):
            raise ValidationError.from_exception_data(
                "ServerConfig",
                [
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "value_error",
                            "the backend is chosen at start-up; restart the server to change it",
                        ),
                        loc=(name,),
                        input=changes[name],
                    )
                    for name in fixed
                ],
            )
        self.config = old.updated(changes)
        self.gate = Gatekeeper(self.config, self.owner_key)
        if "faults" in changes:
            self.fault_rng = random.Random(self.config.faults.seed)
        if self.config.replicas > old.replicas:
            await self.pool.resized()
        return self.config

    # ---- checks ---------------------------------------------------------------------

    def video_renderer(self) -> VideoRenderer | None:
        """What renders ``POST /generate/svd`` here: the backend's (None: it has no SVD).

        A deployment whose models live elsewhere (Ray Serve's frontends) returns its own.
        """
        from .video import video_renderer

        return video_renderer(self.backend)

    def rate_limit_error(self) -> JSONResponse | None:
        limit = self.config.rate_limit_requests
        if limit is None:
            return None
        now = time.monotonic()
        window = self.config.rate_limit_window_s
        while self.rate_window and self.rate_window[0] <= now - window:
            self.rate_window.popleft()
        if len(self.rate_window) >= limit:
            wait = self.rate_window[0] + window - now
            self.stats.rate_limited += 1
            return _message(
                429,
                f"Rate limit exceeded: {limit} requests per {window:g} s.",
                {"Retry-After": str(max(1, int(wait + 0.999)))},
            )
        self.rate_window.append(now)
        return None

    def violates_policy(self, req: ImageGenerationRequest) -> bool:
        text = " ".join(p for p in (req.prompt, req.prompt_2) if p)
        return any(
            re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE)
            for word in self.config.banned_words
            if word
        )

    # ---- generation -----------------------------------------------------------------

    async def generate(
        self, req: ImageGenerationRequest, control: JobControl | None = None
    ) -> tuple[bytes, list[int]]:
        """Wait for a replica, take the configured time, render: the generation body.

        Raises:
            GenerationRefused: every replica is busy and ``max_queued_requests`` wait
                already (429 with ``Retry-After``); async jobs are never refused so.
        """
        self.refuse_if_queue_full()
        async with self.pool:
            return await self._generate_on_replica(req, control)

    def refuse_if_queue_full(self) -> None:
        """Raise a 429 ``GenerationRefused`` when every replica is busy and
        ``max_queued_requests`` sync requests wait already (images and videos alike)."""
        bound = self.config.max_queued_requests
        if (
            bound is not None
            and self.pool.in_flight >= self._replicas()
            and self.pool.queued >= bound
        ):
            raise GenerationRefused(
                429,
                f"Every replica is busy and {bound} requests are queued; retry later.",
                retry_after_s=self.config.queue_retry_after_s,
            )

    async def _generate_on_replica(
        self, req: ImageGenerationRequest, control: JobControl | None = None
    ) -> tuple[bytes, list[int]]:
        started = time.perf_counter()
        seeds = choose_seeds(req.seed, req.image_count, self.seed_rng)
        config = self.config
        loop = asyncio.get_running_loop()

        def render() -> list[Any]:
            # The backend's step callback finds the job's control here (cancel, progress).
            token = CURRENT_CONTROL.set(control)
            try:
                return self.backend.render(req, seeds, config)
            finally:
                CURRENT_CONTROL.reset(token)

        images = await loop.run_in_executor(self.executor, render)
        encoded = [None if im.data is None else _b64(im.data) for im in images]
        # Render first, then sleep what is left of the configured time: an image takes
        # latency_per_image_s on its replica, not that plus the local render (which,
        # with many replicas rendering at once on two cores, added up to 60 ms an image).
        # The event loop may wake a timer up to its clock resolution early: sleep again
        # until the full time has passed, so an image never takes less than configured.
        until = started + config.latency_per_image_s * len(seeds)
        while (remaining := until - time.perf_counter()) > 0:
            if control is not None:
                control.on_step(0, 0)  # a cancelled job stops waiting out its latency
            await asyncio.sleep(min(remaining, 0.05) if control is not None else remaining)
        removed = sum(1 for im in images if im.removed_for_safety)
        self.stats.record_generation(req.engine.value, len(images), removed)
        body = {
            "images": [
                {
                    "image_b64": b64,
                    "seed": im.seed,
                    "removed_for_safety": im.removed_for_safety,
                    "safety_score": im.safety_score,
                }
                for im, b64 in zip(images, encoded, strict=True)
            ],
            "prediction_time_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        return json.dumps(body, separators=(",", ":")).encode(), seeds

    # ---- async jobs -----------------------------------------------------------------

    async def submit_job(
        self,
        engine: str,
        summary: dict[str, Any],
        caller: Caller,
        fails: bool,
        body: bytes,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[str, bool]:
        """Accept an async job of ``engine`` for ``caller`` (``body``: its JSON) and queue it.

        ``summary`` is the request without its image payloads (what the job store shows).

        Returns its response id and whether it is a new job: ``idempotency`` is
        (Idempotency-Key, body digest), and a repeat gets the first job's id (not new).

        Raises:
            GenerationRefused: ``max_queued_jobs`` wait here already (429), the server
                is stopping (503), the key was used with another body (409); nothing
                was stored.
        """
        try:
            job, fresh = await self.jobs.submit(
                caller.owner, engine, body, summary, fails, idempotency
            )
        except IdempotencyConflict as conflict:
            raise _key_conflict(conflict) from None
        except QueueFull:
            raise GenerationRefused(
                429,
                f"{self.config.max_queued_jobs} async jobs are queued already; retry later.",
                retry_after_s=self.config.queue_retry_after_s,
            ) from None
        except ShuttingDown:
            raise GenerationRefused(
                503, "The server is stopping; retry in a moment.", retry_after_s=5
            ) from None
        return job.response_id, fresh

    async def generate_once(
        self, req: ImageGenerationRequest, caller: Caller, body: bytes, idempotency: tuple[str, str]
    ) -> tuple[bytes, list[int]]:
        """A sync generation with an Idempotency-Key: a repeat gets the first answer, unpaid.

        Returns the answer body and its seeds.

        Raises:
            GenerationRefused: as :meth:`generate`, or 409 for a key used with another
                body, or 500 when the first request with the key failed.
        """

        made: list[int] = []

        async def first() -> bytes:
            payload, seeds = await self.generate(req)
            made.extend(seeds)
            return payload

        try:
            job = await self.jobs.run_sync(caller.owner, req, body, idempotency, first)
        except IdempotencyConflict as conflict:
            raise _key_conflict(conflict) from None
        if job.status is JobStatus.COMPLETED:
            result = await self.jobs.result(job.response_id)
            if result is not None:
                # A repeat: the seeds are the first answer's.
                seeds = made or [im["seed"] for im in json.loads(result)["images"]]
                return result, seeds
        raise GenerationRefused(
            500, job.error or "The first request with this Idempotency-Key failed; retry."
        )

    async def job_view(self, response_id: str, caller: Caller, *, with_body: bool) -> JobAnswer:
        """The job as ``caller`` may see it; ``gone`` says why when there is none for them."""
        return await self.jobs.answer(
            response_id, caller.owner, admin=caller.admin, with_body=with_body
        )

    async def cancel_job(self, response_id: str, caller: Caller) -> JobAnswer:
        """Cancel ``caller``'s job: a pending one at once, a running one at its next step."""
        return await self.jobs.cancel(response_id, caller.owner, admin=caller.admin)

    async def job_counts(self) -> dict[str, int]:
        return await self.jobs.counts()

    async def start(self) -> None:
        """Start background work (the app's start-up): the job store's recovery and sweeps."""
        self.jobs.start()

    async def close(self) -> None:
        """Stop background work (the app's shut-down): running jobs get their grace period."""
        await self.jobs.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.checks.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    async def _render_job(self, req: ImageGenerationRequest, control: JobControl) -> bytes:
        body, _ = await self._generate_on_replica(req, control)
        return body


async def _unless_disconnected(
    request: Request, work: Awaitable[tuple[bytes, list[int]]], control: JobControl
) -> tuple[bytes, list[int]]:
    """``work``, cancelled if the client disconnects first (a sync request nobody awaits).

    The cancel flag stops a diffusers render at its next step; cancelling the task frees
    the replica slot at once.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_CHECK_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                control.cancel.set()
                task.cancel()
                raise JobCancelled()
    finally:
        if not task.done():
            control.cancel.set()
            task.cancel()


def _key_conflict(conflict: IdempotencyConflict) -> GenerationRefused:
    return GenerationRefused(
        409,
        "Idempotency-Key: this key was used with another request body (its first request "
        f"is {conflict.response_id}); use a new key for a new request.",
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.octoai
    return state


def _base_url(request: Request, state: ServerState) -> str:
    if state.config.public_base_url:
        return state.config.public_base_url.rstrip("/")
    return str(request.base_url).rstrip("/")


def _validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": errors}, status_code=422)


def _pydantic_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


# ---- routes -------------------------------------------------------------------------


async def generate(request: Request) -> Response:
    state = _state(request)
    caller = state.gate.api_caller(request)
    if isinstance(caller, Response):
        return caller
    name = request.path_params["engine"]
    # A backend that names its engines (the diffusers one: those it has weights for)
    # answers the others as the service answers an engine it does not have.
    served: tuple[Engine, ...] = getattr(state.backend, "engines", tuple(Engine))
    try:
        engine = Engine.parse(name)
    except ValueError:
        engine = None
    if engine is None or engine not in served:
        allowed = ", ".join(e.value for e in served)
        return _message(404, f"Engine {name!r} not found; available: {allowed}.")
    if (limited := state.rate_limit_error()) is not None:
        return limited

    is_async = request.headers.get(ASYNC_HEADER, "").strip().lower() in ("1", "true")
    read = await _read_generation(request, state, engine, is_async)
    if isinstance(read, Response):
        return read
    req, raw, idempotency = read

    record: RequestRecord | None = request.scope.get("octoai.record")
    if is_async:
        return await _submit_async(request, state, engine, req, caller, raw, idempotency, record)

    if idempotency is not None:
        try:
            payload, seeds = await state.generate_once(req, caller, raw, idempotency)
        except GenerationRefused as refused:
            return refused.response()
        if record is not None:
            record.engine, record.images, record.seeds = engine.value, len(seeds), seeds
        return Response(payload, media_type="application/json")
    control = JobControl()
    try:
        payload, seeds = await _unless_disconnected(request, state.generate(req, control), control)
    except GenerationRefused as refused:
        return refused.response()
    except (JobCancelled, asyncio.CancelledError):
        # The client left: its generation stopped at its next step and freed its replica.
        state.stats.disconnected_cancels += 1
        return _message(499, "The client closed the connection; the generation was cancelled.")
    if record is not None:
        record.engine, record.images, record.seeds = engine.value, len(seeds), seeds
    return Response(payload, media_type="application/json")


async def read_json_body(
    request: Request, state: ServerState, engine: str, is_async: bool
) -> tuple[dict[str, Any], bytes, tuple[str, str] | None] | Response:
    """A generation's JSON object, its raw body and (Idempotency-Key, body digest), or the 422.

    Shared by every ``POST /generate/{engine}`` route (images and video): the
    Idempotency-Key header is judged first, then the JSON.
    """
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        state.stats.validation_errors += 1
        return _validation_response(
            [
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "expected 1 to 255 printable ASCII characters without spaces",
                    "type": "value_error",
                }
            ]
        )
    # BodyLimits has read the body already, within its size and time limits.
    raw = await request.body()
    idempotency = None if key is None else (key, body_digest(engine, is_async, raw))
    body, json_problem = parse_json_body(raw)
    if json_problem is not None:
        state.stats.validation_errors += 1
        return _validation_response(json_problem)
    if not isinstance(body, dict):
        state.stats.validation_errors += 1
        return _validation_response(
            [
                {
                    "loc": ["body"],
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                    "type": "model_attributes_type",
                }
            ]
        )
    return body, raw, idempotency


async def _read_generation(
    request: Request, state: ServerState, engine: Engine, is_async: bool
) -> tuple[ImageGenerationRequest, bytes, tuple[str, str] | None] | Response:
    """The request, its raw body and (Idempotency-Key, body digest), or the answer refusing it.

    Judged in order: the Idempotency-Key header, the JSON, the request model, the
    operator's limits and what the backend cannot serve, the content policy.
    """
    read = await read_json_body(request, state, engine.value, is_async)
    if isinstance(read, Response):
        return read
    body, raw, idempotency = read
    try:
        with warnings.catch_warnings():
            # The model ignores a long prompt's tail, as the service does; no need to warn here.
            warnings.simplefilter("ignore", PromptTooLongWarning)
            req = ImageGenerationRequest.from_wire(body, engine)
    except ValidationError as exc:
        state.stats.validation_errors += 1
        return _validation_response(_pydantic_detail(exc))
    loop = asyncio.get_running_loop()
    config = state.config
    # The operator's cost budget first, then headers: an image too big to use is refused before anything decodes it. Then
    # what the backend cannot serve (an unknown asset, photo merge without a backend for
    # it): the client's 422, before the request waits for a replica. Off the event loop:
    # base64 of a 10 MB body takes a while, and the backend's checks read the disk.
    bad_images = await loop.run_in_executor(
        state.checks,
        lambda: (
            over_budget(req, config)
            or oversized_images(req, config)
            or undecodable_images(req)
            or state.backend.check(req)
        ),
    )
    if bad_images:
        state.stats.validation_errors += 1
        return _validation_response(
            [{"loc": ["body", *loc], "msg": msg, "type": "value_error"} for loc, msg in bad_images]
        )
    if state.violates_policy(req):
        state.stats.policy_rejections += 1
        return _message(400, POLICY_MESSAGE)
    return req, raw, idempotency


async def _submit_async(
    request: Request,
    state: ServerState,
    engine: Engine,
    req: ImageGenerationRequest,
    caller: Caller,
    raw: bytes,
    idempotency: tuple[str, str] | None,
    record: RequestRecord | None,
) -> Response:
    """Accept an async job: 201 with its response id and poll URL, or the refusal."""
    config = state.config
    fails = config.faults.job_failure > 0 and state.fault_rng.random() < config.faults.job_failure
    try:
        response_id, fresh = await state.submit_job(
            engine.value, req.summary(), caller, fails, raw, idempotency
        )
    except GenerationRefused as refused:
        return refused.response()
    # A repeat (the same Idempotency-Key) is the first job again: nothing new to count.
    if fresh:
        state.stats.async_submitted += 1
        if fails:
            state.stats.faults["job_failure"] += 1
    if record is not None:
        record.engine, record.response_id = engine.value, response_id
    base = _base_url(request, state)
    return JSONResponse(
        {"response_id": response_id, "poll_url": f"{base}/v1/requests/{response_id}"},
        status_code=201,
    )


async def poll(request: Request) -> Response:
    state = _state(request)
    caller = state.gate.reader(request)
    if isinstance(caller, Response):
        return caller
    job = await state.job_view(request.path_params["response_id"], caller, with_body=False)
    return _poll_answer(request, state, job)


async def cancel(request: Request) -> Response:
    state = _state(request)
    # The job's own token, or the admin (who may stop anyone's job).
    caller = state.gate.reader(request)
    if isinstance(caller, Response):
        return caller
    job = await state.cancel_job(request.path_params["response_id"], caller)
    return _poll_answer(request, state, job)


def _poll_answer(request: Request, state: ServerState, job: JobAnswer) -> Response:
    if job.status is None:
        return _gone(job.response_id, job.gone)
    answer: dict[str, Any] = {"response_id": job.response_id, "status": job.status.value}
    if job.status is JobStatus.COMPLETED:
        answer["response_url"] = f"{_base_url(request, state)}/v1/responses/{job.response_id}"
    elif job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        answer["error"] = job.error
    # Extra fields, which OctoAI's SDKs ignore: where a job waits, how far it has come.
    if job.queue_position is not None:
        answer["queue_position"] = job.queue_position
    if job.progress is not None:
        answer["progress"] = {"step": job.progress[0], "steps": job.progress[1]}
    return JSONResponse(answer)


async def fetch(request: Request) -> Response:
    state = _state(request)
    caller = state.gate.reader(request)
    if isinstance(caller, Response):
        return caller
    job = await state.job_view(request.path_params["response_id"], caller, with_body=True)
    if job.status is None:
        return _gone(job.response_id, job.gone)
    if job.status is JobStatus.FAILED:
        return _message(500, job.error or "The inference failed; resubmit the request.")
    if job.status is JobStatus.CANCELLED:
        return _message(409, f"Response {job.response_id} was cancelled; resubmit the request.")
    if job.body is None:
        return _message(
            409, f"Response {job.response_id} is {job.status.value}; poll until it is completed."
        )
    return Response(job.body, media_type="application/json")


def _gone(response_id: str, why: str | None) -> JSONResponse:
    # Someone else's id is "unknown" too: its existence is not confirmed.
    if why == "expired":
        message = (
            f"Response {response_id[:64]!r} expired: async results are kept for a limited "
            "time (24 hours by default) after they finish; resubmit the request."
        )
    else:
        message = (
            f"Response {response_id[:64]!r} not found: unknown here, or submitted with "
            "another token."
        )
    return JSONResponse({"message": message, "reason": why or "unknown"}, status_code=404)


async def healthcheck(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document(_base_url(request, _state(request))))


async def local_stats(request: Request) -> Response:
    state = _state(request)
    if isinstance(denied := state.gate.admin(request), Response):
        return denied
    if request.method == "DELETE":
        state.stats.reset()
    return JSONResponse(await state.snapshot())


async def local_backend(request: Request) -> Response:
    state = _state(request)
    if isinstance(denied := state.gate.admin(request), Response):
        return denied
    return JSONResponse(state.backend.describe())


async def local_requests(request: Request) -> Response:
    state = _state(request)
    if isinstance(denied := state.gate.admin(request), Response):
        return denied
    try:
        limit = int(request.query_params.get("limit", "100"))
    except ValueError:
        return _message(400, "limit: expected an integer")
    return JSONResponse(state.stats.recent(limit))


async def local_config(request: Request) -> Response:
    state = _state(request)
    if isinstance(denied := state.gate.admin(request), Response):
        return denied
    if request.method == "POST":
        changes, json_problem = parse_json_body(await request.body())
        if json_problem is not None:
            return _validation_response(json_problem)
        if not isinstance(changes, dict):
            return _validation_response(
                [{"loc": ["body"], "msg": "expected an object of changes", "type": "dict_type"}]
            )
        try:
            await state.reconfigure(changes)
        except ValidationError as exc:
            return _validation_response(_pydantic_detail(exc))
        except ValueError as exc:
            return _message(400, str(exc))
    return JSONResponse(state.config.public_dict())


async def _error_answer(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405/500 in the API's error shape, ``{"message": ...}``."""
    if isinstance(exc, HTTPException):
        return JSONResponse(
            {"message": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )
    return _message(500, "Internal server error.")


# ---- the gateway: request ids, the request log, injected faults ----------------------------


class _Gateway:
    """Raw ASGI in front of Starlette, so that it holds uvicorn's own ``send``.

    Dropping a connection without an answer needs the socket: uvicorn's ``send`` is a
    bound method of its request cycle, whose ``transport`` can be aborted. Anything a
    Starlette route returns would always be an answer.
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        request_id = uuid.uuid4().hex
        path = _app_path(scope)
        route = _route_of(path)
        record = RequestRecord(
            request_id=request_id,
            method=scope["method"],
            route=route,
            path=path,
            status=None,
            started_at=time.time(),
        )
        scope["octoai.record"] = record
        CURRENT_RECORD.set(record)
        started = time.perf_counter()
        fault = self._draw_fault(scope["method"], route)
        record.fault = fault
        if fault is not None:
            state.stats.faults[fault] += 1

        recorded = False

        def log() -> None:
            nonlocal recorded
            # The controls are not part of the API: counting them would blur the counts
            # that tests assert on.
            if not recorded and not route.startswith("/_local/"):
                record.duration_ms = round((time.perf_counter() - started) * 1000, 3)
                state.stats.record_answer(record)
            recorded = True

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-user-request-id", request_id.encode()))
                headers.extend(SECURITY_HEADERS)
                if state.replica_name is not None:
                    headers.append((b"x-octoai-frontend", state.replica_name.encode()))
                if record.replica is not None:
                    headers.append((b"x-octoai-replica", record.replica.encode()))
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append(NO_STORE)
                if message["status"] >= 500 and not any(
                    name.lower() == b"connection" for name, _ in headers
                ):
                    # uvicorn drops the connection after an unhandled error: say so, or
                    # a client's next request on it meets a reset instead of an answer.
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
                if fault == "slow":
                    await asyncio.sleep(state.config.faults.slow_s)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Logged before the last bytes leave: a client that reads its answer and
                # asks for the stats at once must find this request counted.
                log()
            await send(message)

        try:
            if fault == "drop_connection":
                log()  # before the drop: the client may ask for the stats at once
                await _drop(send)
            elif fault in ("rate_limited", "error_500", "error_503"):
                await _fault_response(fault, state)(scope, receive, send_with_id)
            elif fault == "drop_after_render":
                await self.app(scope, receive, _swallow())
                log()
                await _drop(send)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            log()

    def _draw_fault(self, method: str, route: str) -> str | None:
        faults = self.state.config.faults
        if faults.total <= 0:
            return None
        eligible = route == "/generate/{engine}" and method == "POST"
        if faults.on_async_routes and route.startswith("/v1/"):
            eligible = True
        if not eligible:
            return None
        draw = self.state.fault_rng.random()
        edge = 0.0
        for name in (
            "rate_limited",
            "error_500",
            "error_503",
            "drop_connection",
            "drop_after_render",
            "slow",
        ):
            edge += getattr(faults, name)
            if draw < edge:
                return name
        return None


def _fault_response(fault: str, state: ServerState) -> JSONResponse:
    if fault == "rate_limited":
        return _message(
            429,
            "Too many requests; retry later.",
            {"Retry-After": str(state.config.faults.retry_after_s)},
        )
    if fault == "error_503":
        return _message(503, "Service temporarily unavailable; retry later.")
    return _message(500, "Internal server error.")


def _swallow() -> Send:
    async def send(message: Message) -> None:
        """The answer that never leaves the server."""

    return send


async def _drop(send: Send) -> None:
    """Close the connection without an answer (a client sees a connection error, not a 500)."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise RuntimeError("dropping a connection needs uvicorn's transport")
    transport.abort()
    # Return only once uvicorn has seen the loss, or it would answer the unanswered
    # request with its own 500.
    for _ in range(200):
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0.005)


# ---- the app --------------------------------------------------------------------------------


def create_app(
    config: ServerConfig | None = None,
    *,
    backend: Backend | None = None,
    state: ServerState | None = None,
) -> Starlette:
    """The OctoAI-compatible server as an ASGI app (run it with uvicorn).

    ``app.state.octoai`` is the :class:`ServerState` (config, backend, stats, jobs).
    ``backend`` defaults to the one ``config.backend`` names (loaded here, before serving);
    pass ``state`` for one of your own (a deployment's subclass). A configuration that
    cannot serve (no token and not public) raises
    :class:`~dagster_octoai.server.config.StartupError` before any backend loads.

    Examples:
        >>> app = create_app(ServerConfig(token="t0k"))
        >>> app.state.octoai.config.replicas
        4
        >>> create_app(ServerConfig())
        Traceback (most recent call last):
        ...
        dagster_octoai.server.config.StartupError: token: the server is private and has no token; ...
    """
    if state is None:
        config = config or ServerConfig()
        config.check_startable()
        state = ServerState(config, backend)
    else:
        state.config.check_startable()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.close()

    from .video import video_routes

    routes = [
        # Before /generate/{engine}, which would take "svd" for an image engine.
        *video_routes(state),
        Route("/generate/{engine}", generate, methods=["POST"]),
        Route("/v1/requests/{response_id}", poll, methods=["GET"]),
        Route("/v1/requests/{response_id}", cancel, methods=["DELETE"]),
        Route("/v1/responses/{response_id}", fetch, methods=["GET"]),
        Route("/healthcheck", healthcheck, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    if state.config.playground:
        from .playground import playground_routes

        routes.extend(playground_routes(getattr(state.backend, "engines", None)))
    if state.config.control_routes:
        routes.extend(
            [
                Route("/_local/stats", local_stats, methods=["GET", "DELETE"]),
                Route("/_local/requests", local_requests, methods=["GET"]),
                Route("/_local/backend", local_backend, methods=["GET"]),
                Route("/_local/config", local_config, methods=["GET", "POST"]),
            ]
        )
    app = Starlette(
        routes=routes,
        exception_handlers={404: _error_answer, 405: _error_answer, 500: _error_answer},
        lifespan=lifespan,
    )
    app.state.octoai = state
    # The gateway goes outside Starlette's own middleware stack (so it holds uvicorn's
    # ``send``), while ``app`` stays a Starlette whose __call__ runs through it. The body
    # limits sit inside it, so that their 408s and 413s are logged and carry a request id.
    app.middleware_stack = _Gateway(
        BodyLimits(app.build_middleware_stack(), lambda: state.config), state
    )
    return app
