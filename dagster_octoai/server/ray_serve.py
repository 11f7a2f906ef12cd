"""Endpoints on Ray Serve: the same OctoAI API, one replica per GPU, scaling with the load.

Two deployments make one Serve application (``dagster-octoai serve-ray``, or
:func:`deploy`):

- ``OctoAIFrontend``, the ingress: the whole HTTP app of :func:`~.app.create_app` (auth,
  limits, validation, the playground, polls and fetches), CPU only and light. It sends
  each generation to a generator through a deployment handle.
- ``OctoAIGenerator``: the backend (placeholder or diffusers), loaded once per replica,
  one generation at a time (``max_ongoing_requests=1``: the seed's "1 GPU can support a
  single request at a time"), one GPU per replica (a CPU slot on CPU). Serve scales it
  between ``min_replicas`` and ``max_replicas`` (``0`` = scale to zero), removes idle
  replicas after ``idle_timeout_s`` (Serve's ``downscale_delay_s``), and queues requests
  beyond the replicas at each frontend; past ``max_queued_requests`` a sync request is
  answered 429 with ``Retry-After``. Async jobs wait for room instead (they stay
  ``pending``).

Async jobs live in the durable job store (``jobs_url``: S3, shared by every frontend;
a ``state_dir`` on one machine), run by each frontend's :class:`~.jobqueue.JobQueue` as on
the single server: any frontend answers any job, ``Idempotency-Key`` and ``DELETE``
work the same, a frontend that dies leaves its running jobs to another (retried once
when their lease lapses), and a job whose generator replica dies runs once more on
another replica, then fails with a reason. No completed result lives in a Ray process.

Nothing here imports Dagster; Ray itself is imported by this module only (the ``ray``
extra: ``pip install 'dagster-octoai[server,ray]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import typing
from collections import Counter
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from ..api.models import Engine, ImageGenerationRequest
from ..api.video import VideoGenerationRequest
from .app import GenerationRefused, ServerState, create_app
from .backends import Problem, RenderedImage
from .config import ServerConfig
from .jobqueue import JobControl, JobLost
from .jobs import LOST_MESSAGE
from .ray_config import RayEndpointConfig
from .ray_security import (
    ClusterToken,
    bind_serve_replicas_to_the_node_address,
    closed_cluster_environment,
)
from .stats import CURRENT_RECORD
from .video import VideoRenderer

__all__ = [
    "APP_NAME",
    "RayEndpointConfig",
    "build_app",
    "deploy",
    "start_local_cluster",
    "start_serve",
]

APP_NAME = "octoai"
_BACKPRESSURE_RETRY_S = 0.25
# How often a frontend waiting on a generator looks whether the job was cancelled.
_CANCEL_CHECK_S = 0.1


# ---- the generators -------------------------------------------------------------------------


def _replica_tag() -> str:
    try:
        return str(serve.get_replica_context().replica_tag)
    except Exception:  # outside a replica (a unit test): no tag
        return "local"


@serve.deployment(name="OctoAIGenerator", max_ongoing_requests=1)
class Generator:
    """One backend per replica, one generation at a time."""

    def __init__(self, server: dict[str, Any]) -> None:
        bind_serve_replicas_to_the_node_address()
        # The generator keeps no jobs: the frontends do, in the shared store.
        config = ServerConfig.model_validate(server).updated(
            {"replicas": 1, "state_dir": None, "jobs_url": None}
        )
        # The backend (weights, devices) loads here, once per replica.
        self.state = ServerState(config)
        self.tag = _replica_tag()
        self._video: VideoRenderer | None = None

    async def generate(self, request: ImageGenerationRequest) -> dict[str, Any]:
        """The generation body, or the backend's problems with the request.

        A caller that cancels the call (a cancelled job, a sync client gone) stops the
        render at its next step, as on the single server.
        """
        problems = self.state.backend.check(request)
        if problems:
            return {"problems": problems}
        control = JobControl()
        # One generation at a time on this replica: the counter's change is this request's.
        before = self.state.stats.removed_for_safety
        try:
            payload, seeds = await self.state.generate(request, control)
        except asyncio.CancelledError:
            control.cancel.set()
            raise
        removed = self.state.stats.removed_for_safety - before
        return {"body": payload, "seeds": seeds, "removed": removed, "replica": self.tag}

    async def generate_video(
        self, request: VideoGenerationRequest, seeds: list[int]
    ) -> list[bytes]:
        """One MP4 per seed from this replica's SVD renderer (loaded on first use)."""
        if self._video is None:
            self._video = self.state.video_renderer()
            if self._video is None:
                raise RuntimeError(
                    "this generator has no Stable Video Diffusion model (the diffusers "
                    "backend needs svd/base in its model directory)"
                )
        return await asyncio.get_running_loop().run_in_executor(
            self.state.executor, self._video.render_video, request, seeds
        )

    def describe(self) -> dict[str, object]:
        return {**self.state.backend.describe(), "replica": self.tag}


# ---- the frontends ----------------------------------------------------------------------------


class _RemoteBackend:
    """The frontend's stand-in for the backend, which lives on the generators.

    The frontend loads no weights. The asset names a request gives (checkpoint, VAE,
    ControlNet, LoRAs, textual inversions) it checks against the diffusers model
    directory when this node sees it (one machine, or a volume every node mounts), so that
    an unknown name is a 422 before anything queues, for async jobs too. What remains, or
    everything where the directory is not visible here, is judged on the generator: a sync
    request's problems come back as its 422, an async job's make it fail with the same
    message.
    """

    name = "ray-serve"

    def __init__(self, config: ServerConfig) -> None:
        self._backend = config.backend
        self._library: Any = None
        if config.backend == "diffusers" and config.models:
            from .backends.diffusers.library import ModelLibrary  # no torch

            # Not visible from this node (no shared volume): the generators judge names.
            with contextlib.suppress(OSError):
                self._library = ModelLibrary(config.models)

    @property
    def replicas(self) -> int | None:
        return None

    @property
    def engines(self) -> tuple[Engine, ...]:
        """Those the model directory has weights for (404 for the others, as one server
        answers), or every engine where this node cannot see it (the generators judge)."""
        if self._library is None:
            return tuple(Engine)
        engines: tuple[Engine, ...] = self._library.engines
        return engines

    def describe(self) -> dict[str, object]:
        return {"backend": self._backend, "deployment": "ray-serve"}

    def check(self, request: ImageGenerationRequest) -> list[Problem]:
        if self._library is None:
            return []
        problems: list[Problem] = self._library.missing(request)
        return problems

    def render(
        self, request: ImageGenerationRequest, seeds: list[int], config: ServerConfig
    ) -> list[RenderedImage]:
        raise RuntimeError("a Ray Serve frontend renders nothing: its generators do")

    def close(self) -> None:
        return None


class _GeneratorVideoRenderer:
    """The frontend's video renderer: each clip rendered by a generator replica.

    Called on a worker thread of the frontend (the video route renders off its event
    loop), so it waits for the generator's answer there.
    """

    name = "ray-serve"

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    def render_video(self, request: VideoGenerationRequest, seeds: list[int]) -> list[bytes]:
        clips: list[bytes] = self.generator.generate_video.remote(request, seeds).result()
        return clips


class FrontendState(ServerState):
    """A frontend replica's state: jobs in the shared store, generations on the generators.

    Async jobs go through the same :class:`~.jobqueue.JobQueue` as on the single server,
    on the store every frontend shares (``jobs_url``): any frontend answers a poll, a
    fetch, a cancel or a repeated ``Idempotency-Key`` for any job, and a frontend that
    dies leaves its jobs to the others (its lease lapses; they run them again once).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        generator: Any,
        max_queued_requests: int,
        retry_after_s: int,
    ) -> None:
        # Sync requests queue at Serve's handle (up to max_queued_requests), never here;
        # async jobs run at most config.replicas (max_replicas) at a time from each
        # frontend, the rest stay pending in the store.
        super().__init__(config, _RemoteBackend(config))
        self.generator = generator
        self.max_queued_requests = max_queued_requests
        self.retry_after_s = retry_after_s
        self.replica_name = _replica_tag()
        self.generations_by_replica: Counter[str] = Counter()

    async def generate(
        self, req: ImageGenerationRequest, control: JobControl | None = None
    ) -> tuple[bytes, list[int]]:
        try:
            result = await self._on_generator(req, control)
        except BackPressureError:
            raise GenerationRefused(
                429,
                f"Every replica is busy and {self.max_queued_requests} requests are queued; "
                "retry later.",
                retry_after_s=self.retry_after_s,
            ) from None
        except RayActorError:
            raise GenerationRefused(
                503, "The replica serving this request stopped; retry the request."
            ) from None
        return self._answer(req, result)

    async def _on_generator(
        self, req: ImageGenerationRequest, control: JobControl | None
    ) -> dict[str, Any]:
        """One call of a generator; cancelled there too if ``control`` is cancelled here."""
        response = self.generator.generate.remote(req)
        call = asyncio.ensure_future(response)
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=_CANCEL_CHECK_S)
                if done:
                    result: dict[str, Any] = call.result()
                    return result
                if control is not None:
                    control.on_step(control.step, control.steps)  # raises once cancelled
        except BaseException:
            response.cancel()
            call.cancel()
            raise

    def _answer(
        self, req: ImageGenerationRequest, result: dict[str, Any]
    ) -> tuple[bytes, list[int]]:
        if "problems" in result:
            raise GenerationRefused(
                422,
                "invalid request",
                detail=[
                    {"loc": ["body", *loc], "msg": msg, "type": "value_error"}
                    for loc, msg in result["problems"]
                ],
            )
        seeds: list[int] = result["seeds"]
        self.stats.record_generation(req.engine.value, len(seeds), result["removed"])
        self.generations_by_replica[result["replica"]] += 1
        if (record := CURRENT_RECORD.get()) is not None:
            record.replica = result["replica"]
        body: bytes = result["body"]
        return body, seeds

    async def _render_job(self, req: ImageGenerationRequest, control: JobControl) -> bytes:
        """An async job on a generator: it waits for room, and a dead replica costs one retry."""
        lost = 0
        while True:
            try:
                result = await self._on_generator(req, control)
            except BackPressureError:
                # Async jobs wait for room instead of a 429.
                await asyncio.sleep(_BACKPRESSURE_RETRY_S)
                continue
            except RayActorError:
                lost += 1
                if lost > 1:
                    raise JobLost(LOST_MESSAGE) from None
                continue
            if "problems" in result:
                message = "; ".join(
                    f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in result["problems"]
                )
                raise JobLost(f"The request cannot run: {message}")
            body, _ = self._answer(req, result)
            return body

    def video_renderer(self) -> VideoRenderer | None:
        """The generators', where they can have an SVD: the placeholder backend always, the
        diffusers one when its model directory has ``svd/base`` (or this node cannot see
        it: then a generator without one fails the request, naming what is missing)."""
        config = self.config
        if config.backend == "diffusers" and config.models:
            root = Path(config.models)
            if root.is_dir() and not (root / "svd" / "base" / "model_index.json").is_file():
                return None
        elif config.backend != "placeholder":
            return None
        return _GeneratorVideoRenderer(self.generator)

    async def snapshot(self) -> dict[str, Any]:
        snapshot = await super().snapshot()
        snapshot["frontend"] = self.replica_name
        snapshot["generations_by_replica"] = dict(self.generations_by_replica)
        return snapshot


@serve.deployment(
    name="OctoAIFrontend", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}
)
@serve.ingress()
class Frontend:
    """The HTTP ingress: the OctoAI API, the playground and the control routes."""

    def __init__(self, server: dict[str, Any], generator: Any, settings: dict[str, Any]) -> None:
        bind_serve_replicas_to_the_node_address()
        self.state = FrontendState(
            ServerConfig.model_validate(server), generator=generator, **settings
        )

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(state=self.state)


# ---- deploying ----------------------------------------------------------------------------------


def build_app(config: RayEndpointConfig, *, cluster_gpus: float = 0.0) -> Any:
    """The Serve application (frontends and generators), ready for ``serve.run``."""
    config.server.check_startable()
    # The frontends' job lease is the endpoint's; owners' hashes come from the shared
    # store's key, so every frontend (and the next deployment) knows whose each job is.
    server = config.server.updated(
        {"async_lease_s": config.job_lease_s, "replicas": max(1, config.max_replicas)}
    ).secret_dict()
    # serve.deployment's typing keeps the class type; the objects are Serve deployments.
    generator = (
        typing.cast(Any, Generator)
        .options(
            autoscaling_config=config.autoscaling_config(),
            max_queued_requests=config.max_queued_requests,
            graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
            ray_actor_options=config.generator_actor_options(cluster_gpus),
        )
        .bind(server)
    )
    settings = {
        "max_queued_requests": config.max_queued_requests,
        "retry_after_s": config.retry_after_s,
    }
    return (
        typing.cast(Any, Frontend)
        .options(num_replicas=config.frontend_replicas)
        .bind(server, generator, settings)
    )


def deploy(config: RayEndpointConfig, *, name: str = APP_NAME, route_prefix: str = "/") -> None:
    """Deploy the endpoint on the connected Ray cluster (``ray.init`` / ``serve.start`` first)."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0.0))  # type: ignore[no-untyped-call]
    serve.run(build_app(config, cluster_gpus=gpus), name=name, route_prefix=route_prefix)


# Serve's controller gives a new HTTP proxy 5 s to answer its first ready check before it
# kills the proxy and starts another (10 s, 15 s... after that). Starting the proxy's Python
# process alone can take longer on a loaded machine (a shared 2-core CI box); a local
# cluster gives it 30 s. A variable already set in the environment wins.
LOCAL_CLUSTER_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}


def start_local_cluster(
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    attempts: int = 3,
    dashboard: bool = False,
    **init: Any,
) -> ClusterToken:
    """``ray.init`` of a local cluster closed to the network, retried if its node is slow.

    Every Ray port listens on the loopback interface, the dashboard is off unless asked
    for (then on loopback too), and Ray's token authentication is on with a token
    generated for this cluster (:mod:`~.ray_security`). Returns that token's file: pass
    its :meth:`~.ClusterToken.env` to another driver on this machine, and
    :meth:`~.ClusterToken.remove` it once the cluster is stopped.

    Ray gives a new node's raylet a fixed 30 s to register with its GCS; on a loaded machine
    (a shared 2-core CI box) that can pass, and Ray's message suggests starting again.
    """
    import ray

    token = ClusterToken.generate()
    # Every Ray process of the new cluster inherits the environment ray.init starts it in;
    # the caller's own environment is left as it was.
    saved = {name: os.environ.get(name) for name in LOCAL_CLUSTER_ENV}
    for name, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)
    try:
        with closed_cluster_environment(token):
            for attempt in range(1, attempts + 1):
                try:
                    ray.init(
                        num_cpus=num_cpus,
                        num_gpus=num_gpus,
                        include_dashboard=dashboard,
                        dashboard_host="127.0.0.1",
                        configure_logging=False,
                        **init,
                    )
                    break
                except Exception as exc:
                    ray.shutdown()
                    if attempt == attempts or "timed out during startup" not in str(exc):
                        raise
    except BaseException:
        token.remove()
        raise
    finally:
        for name, was in saved.items():
            if was is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = was
    return token


def start_serve(http_options: dict[str, Any], *, attempts: int = 3) -> None:
    """``serve.start`` on the connected cluster, started again if its first proxy died.

    Serve waits a fixed 60 s for its HTTP proxy, and its controller kills a proxy that does
    not answer its ready check in time (then starts another, which ``serve.start`` does not
    wait for): on a loaded machine ``serve.start`` then fails with the first proxy's
    ``ActorDiedError``. Serve is shut down and started again, ``attempts`` times in all.
    """
    import ray

    for attempt in range(1, attempts + 1):
        try:
            serve.start(http_options=http_options)
            return
        except (ray.exceptions.ActorDiedError, TimeoutError):
            serve.shutdown()  # type: ignore[no-untyped-call]
            if attempt == attempts:
                raise
