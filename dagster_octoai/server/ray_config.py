"""The settings of an endpoint on Ray Serve (:mod:`~dagster_octoai.server.ray_serve`).

Apart from the module that deploys, so that the command line and a config file can be
checked without importing Ray.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import ServerConfig

__all__ = ["RayEndpointConfig"]


class RayEndpointConfig(BaseModel):
    """An endpoint on Ray Serve: OctoAI's endpoint settings, said in Ray Serve's terms.

    ============================  =============================================
    the seed's endpoint setting   Ray Serve
    ============================  =============================================
    replicas (1 replica = 1 GPU)  ``OctoAIGenerator`` replicas, ``num_gpus=1`` each
    minimum replicas              ``autoscaling_config.min_replicas``
    maximum replicas              ``autoscaling_config.max_replicas``
    timeout (idle, then down)     ``downscale_delay_s`` and ``downscale_to_zero_delay_s``
    minimum 0: scale to zero      ``min_replicas=0``
    queue beyond the maximum      the handle's queue, bounded by ``max_queued_requests``
    private by default            ``ServerConfig.token`` (or ``public``)
    web interface                 ``/playground`` on the frontend
    ============================  =============================================

    Examples:
        >>> cfg = RayEndpointConfig(server=ServerConfig(token="t0k"), max_replicas=4)
        >>> cfg.autoscaling_config()["max_replicas"], cfg.autoscaling_config()["min_replicas"]
        (4, 1)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: ServerConfig = Field(description="The API's settings: tokens, limits, backend, ...")
    min_replicas: int = Field(
        default=1, ge=0, description="Replicas kept running when idle (0 = scale to zero)."
    )
    max_replicas: int = Field(
        default=1, ge=1, description="Most replicas at once (one GPU or CPU slot each)."
    )
    initial_replicas: int | None = Field(
        default=None, ge=0, description="Replicas at deployment; None = min_replicas."
    )
    idle_timeout_s: float = Field(
        default=300.0,
        ge=0,
        description="Idle seconds before replicas scale down (Serve's downscale_delay_s).",
    )
    upscale_delay_s: float = Field(
        default=2.0, ge=0, description="Seconds of backlog before replicas scale up."
    )
    look_back_period_s: float = Field(
        default=10.0, gt=0, description="Window over which Serve averages the load, seconds."
    )
    max_queued_requests: int = Field(
        default=64,
        ge=1,
        description="Sync requests queued at each frontend beyond the busy replicas; more get 429.",
    )
    retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After (seconds) of a 429 past the queue bound."
    )
    gpus_per_replica: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per generator replica; None = 1 if the cluster has GPUs, else 0.",
    )
    cpus_per_replica: float = Field(
        default=1.0, ge=0, description="CPUs per generator replica (the slot on a CPU cluster)."
    )
    frontend_replicas: int = Field(
        default=1, ge=1, description="Frontend (HTTP) replicas; they hold no GPU."
    )
    job_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="An async job whose holder stops renewing it this long fails (a dead replica).",
    )
    graceful_shutdown_timeout_s: float = Field(
        default=120.0,
        ge=0,
        description="How long a replica being removed may finish its generation, seconds.",
    )

    @model_validator(mode="after")
    def _replicas_fit(self) -> RayEndpointConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas: {self.min_replicas} is more than max_replicas {self.max_replicas}"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas: must lie between min_replicas and max_replicas")
        if self.frontend_replicas > 1 and not (self.server.jobs_url or self.server.state_dir):
            raise ValueError(
                f"frontend_replicas: {self.frontend_replicas} frontends need one job store "
                "they all share; pass --jobs-url s3://bucket/prefix (or --state-dir on a "
                "single machine), or run one frontend"
            )
        return self

    def autoscaling_config(self) -> dict[str, Any]:
        """The generator's ``autoscaling_config`` for Ray Serve."""
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.initial_replicas,
            "max_replicas": self.max_replicas,
            # One request at a time per replica: every waiting request asks for a replica.
            "target_ongoing_requests": 1,
            "downscale_delay_s": self.idle_timeout_s,
            "downscale_to_zero_delay_s": self.idle_timeout_s,
            "upscale_delay_s": self.upscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }

    def generator_actor_options(self, cluster_gpus: float) -> dict[str, Any]:
        gpus = self.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if cluster_gpus > 0 else 0.0
        return {"num_gpus": gpus, "num_cpus": self.cpus_per_replica}
