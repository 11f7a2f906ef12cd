"""Endpoints on Ray Serve: the same OctoAI API, one replica per GPU, scaling with the load.

Three deployments make one Serve application (``dagster-octoai serve-ray``, or
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
- ``OctoAIJobBoard``: one replica holding every async job (status, owner, result), so
  that a poll answered by any frontend sees the job. A job's holder renews its lease (the
  frontend while the job waits, the generator while it runs); a holder that dies fails
  the job: at once when the frontend sees its generator die, or when the lease runs out.

Nothing here imports Dagster; Ray itself is imported by this module only (the ``ray``
extra: ``pip install 'dagster-octoai[server,ray]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
import typing
from collections import Counter
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from ..api.models import Engine, ImageGenerationRequest, JobStatus
from .app import GenerationRefused, ServerState, create_app
from .backends import Problem, RenderedImage
from .config import ServerConfig
from .jobqueue import JobAnswer, JobControl
from .jobs import LOST_MESSAGE, JobStore, JobView
from .ray_config import RayEndpointConfig
from .ray_security import (
    ClusterToken,
    bind_serve_replicas_to_the_node_address,
    closed_cluster_environment,
)
from .security import Caller
from .stats import CURRENT_RECORD

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


# ---- the job board ------------------------------------------------------------------------


@serve.deployment(
    name="OctoAIJobBoard",
    num_replicas=1,
    max_ongoing_requests=10_000,
    ray_actor_options={"num_cpus": 0},
)
class JobBoard:
    """Every async job of the endpoint, in one place for every frontend and generator."""

    def __init__(self, result_ttl_s: float) -> None:
        bind_serve_replicas_to_the_node_address()
        self.store = JobStore(lambda: result_ttl_s, lambda count: None)

    def add(self, owner: str, lease_s: float) -> str:
        return self.store.add(None, fails=False, owner=owner, lease_s=lease_s).response_id

    def view(self, response_id: str, owner: str, admin: bool, with_body: bool) -> JobView | None:
        return self.store.view(response_id, owner, admin=admin, with_body=with_body)

    def running(self, response_id: str, lease_s: float) -> bool:
        """Mark a job running; False when it already ended (its lease ran out)."""
        job = self.store.get(response_id)
        if job is None or job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
            return False
        job.status = JobStatus.RUNNING
        job.lease_until = time.monotonic() + lease_s
        return True

    def renew(self, response_ids: list[str], lease_s: float) -> None:
        self.store.renew(response_ids, lease_s)

    def complete(self, response_id: str, body: bytes) -> None:
        if (job := self.store.get(response_id)) is not None:
            job.finish(JobStatus.COMPLETED, body=body)

    def fail(self, response_id: str, error: str) -> None:
        if (job := self.store.get(response_id)) is not None:
            job.finish(JobStatus.FAILED, error=error)

    def counts(self) -> dict[str, int]:
        return self.store.by_status()


# ---- the generators -------------------------------------------------------------------------


def _replica_tag() -> str:
    try:
        return str(serve.get_replica_context().replica_tag)
    except Exception:  # outside a replica (a unit test): no tag
        return "local"


@serve.deployment(name="OctoAIGenerator", max_ongoing_requests=1)
class Generator:
    """One backend per replica, one generation at a time."""

    def __init__(self, server: dict[str, Any], board: Any, lease_s: float) -> None:
        bind_serve_replicas_to_the_node_address()
        config = ServerConfig.model_validate(server).updated({"replicas": 1})
        # The backend (weights, devices) loads here, once per replica.
        self.state = ServerState(config)
        self.board = board
        self.lease_s = lease_s
        self.tag = _replica_tag()

    async def generate(self, request: ImageGenerationRequest) -> dict[str, Any]:
        """The generation body, or the backend's problems with the request."""
        problems = self.state.backend.check(request)
        if problems:
            return {"problems": problems}
        # One generation at a time on this replica: the counter's change is this request's.
        before = self.state.stats.removed_for_safety
        payload, seeds = await self.state.generate(request)
        removed = self.state.stats.removed_for_safety - before
        return {"body": payload, "seeds": seeds, "removed": removed, "replica": self.tag}

    async def run_job(self, response_id: str, request: ImageGenerationRequest) -> str:
        """Run an accepted job and write its end to the board; the job's final status."""
        if not await self.board.running.remote(response_id, self.lease_s):
            return "gone"
        renewing = asyncio.get_running_loop().create_task(self._renew(response_id))
        try:
            problems = self.state.backend.check(request)
            if problems:
                message = "; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems)
                await self.board.fail.remote(response_id, f"The request cannot run: {message}")
                return "failed"
            payload, _ = await self.state.generate(request)
        except Exception as exc:  # a backend bug must not leave the job running for ever
            await self.board.fail.remote(
                response_id, f"The inference failed: {type(exc).__name__}."
            )
            return "failed"
        finally:
            renewing.cancel()
        await self.board.complete.remote(response_id, payload)
        return "completed"

    async def _renew(self, response_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self.board.renew.remote([response_id], self.lease_s)

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


class FrontendState(ServerState):
    """A frontend replica's state: jobs on the board, generations on the generators."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        owner_key: bytes,
        generator: Any,
        board: Any,
        lease_s: float,
        max_queued_requests: int,
        retry_after_s: int,
    ) -> None:
        # The frontend never queues: Serve's handle does, up to max_queued_requests.
        super().__init__(
            config.updated({"replicas": 1024}),
            _RemoteBackend(config),
            owner_key=owner_key,
        )
        self.generator = generator
        self.board = board
        self.lease_s = lease_s
        self.max_queued_requests = max_queued_requests
        self.retry_after_s = retry_after_s
        self.replica_name = _replica_tag()
        self.generations_by_replica: Counter[str] = Counter()
        self._held: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None

    async def generate(
        self, req: ImageGenerationRequest, control: JobControl | None = None
    ) -> tuple[bytes, list[int]]:
        try:
            result: dict[str, Any] = await self.generator.generate.remote(req)
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

    async def submit_job(
        self,
        req: ImageGenerationRequest,
        caller: Caller,
        fails: bool,
        body: bytes,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[str, bool]:
        response_id: str = await self.board.add.remote(caller.owner, self.lease_s)
        self._held.add(response_id)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())
        task = asyncio.get_running_loop().create_task(self._dispatch(response_id, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return response_id, True

    async def _dispatch(self, response_id: str, req: ImageGenerationRequest) -> None:
        """Hand the job to a generator once one has room; fail it if its replica dies."""
        try:
            while True:
                try:
                    await self.generator.run_job.remote(response_id, req)
                    return
                except BackPressureError:
                    # Async jobs wait for room (still pending) instead of a 429.
                    await asyncio.sleep(_BACKPRESSURE_RETRY_S)
                except RayActorError:
                    await self.board.fail.remote(response_id, LOST_MESSAGE)
                    return
                except Exception as exc:
                    await self.board.fail.remote(
                        response_id, f"The inference failed: {type(exc).__name__}."
                    )
                    return
        finally:
            self._held.discard(response_id)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if self._held:
                with contextlib.suppress(Exception):  # the next round tries again
                    await self.board.renew.remote(sorted(self._held), self.lease_s)

    async def job_view(self, response_id: str, caller: Caller, *, with_body: bool) -> JobAnswer:
        view: JobView | None = await self.board.view.remote(
            response_id, caller.owner, caller.admin, with_body
        )
        if view is None:
            return JobAnswer.missing(response_id, "unknown")
        return JobAnswer(view.response_id, view.status, view.error, body=view.body)

    async def job_counts(self) -> dict[str, int]:
        counts: dict[str, int] = await self.board.counts.remote()
        return counts

    async def snapshot(self) -> dict[str, Any]:
        snapshot = await super().snapshot()
        snapshot["frontend"] = self.replica_name
        snapshot["generations_by_replica"] = dict(self.generations_by_replica)
        return snapshot

    async def close(self) -> None:
        for task in [*self._tasks, self._renewer]:
            if task is not None:
                task.cancel()
        await super().close()


@serve.deployment(
    name="OctoAIFrontend", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}
)
@serve.ingress()
class Frontend:
    """The HTTP ingress: the OctoAI API, the playground and the control routes."""

    def __init__(
        self,
        server: dict[str, Any],
        owner_key: bytes,
        generator: Any,
        board: Any,
        settings: dict[str, Any],
    ) -> None:
        bind_serve_replicas_to_the_node_address()
        self.state = FrontendState(
            ServerConfig.model_validate(server),
            owner_key=owner_key,
            generator=generator,
            board=board,
            **settings,
        )

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(state=self.state)


# ---- deploying ----------------------------------------------------------------------------------


def build_app(config: RayEndpointConfig, *, cluster_gpus: float = 0.0) -> Any:
    """The Serve application (frontend, generators, job board), ready for ``serve.run``."""
    config.server.check_startable()
    server = config.server.secret_dict()
    # Every frontend must hash a token to the same owner: one key for the application.
    owner_key = secrets.token_bytes(32)
    # serve.deployment's typing keeps the class type; the objects are Serve deployments.
    board = typing.cast(Any, JobBoard).bind(config.server.result_ttl_s)
    generator = (
        typing.cast(Any, Generator)
        .options(
            autoscaling_config=config.autoscaling_config(),
            max_queued_requests=config.max_queued_requests,
            graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
            ray_actor_options=config.generator_actor_options(cluster_gpus),
        )
        .bind(server, board, config.job_lease_s)
    )
    settings = {
        "lease_s": config.job_lease_s,
        "max_queued_requests": config.max_queued_requests,
        "retry_after_s": config.retry_after_s,
    }
    return (
        typing.cast(Any, Frontend)
        .options(num_replicas=config.frontend_replicas)
        .bind(server, owner_key, generator, board, settings)
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
