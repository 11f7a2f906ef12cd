"""What the server does: who may call it, its limits, latency, replicas, expiry, faults.

Every knob is a field of :class:`ServerConfig` (faults of :class:`FaultConfig`), so the
command line, the pytest fixtures and ``POST /_local/config`` change the same things.
The defaults are those of an endpoint on the internet: private (a token is required),
the ``/_local`` control routes off, request bodies, input images and slow clients bounded.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = ["BACKEND_FIELDS", "DEFAULT_RESULT_TTL_S", "FaultConfig", "ServerConfig", "StartupError"]

DEFAULT_RESULT_TTL_S = 24 * 3600.0  # the seed: async results are kept 24 hours
MIB = 1024 * 1024
# What a bearer token may hold (RFC 6750's b64token is stricter; any visible ASCII is fine
# in a header). A space, a line break or a non-ASCII character cannot travel in one.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
# Settings the control routes may not change: they decide who may use the control routes.
RUNTIME_FIXED = frozenset(
    {"control_routes", "admin_token", "state_dir", "jobs_url", "jobs_endpoint_url"}
)


class StartupError(ValueError):
    """The configuration cannot serve: no token and not public, for instance."""


def _check_token(value: SecretStr | None, field: str) -> SecretStr | None:
    if value is None:
        return None
    text = value.get_secret_value()
    if not text.strip():
        raise ValueError(
            f"{field}: an empty token would let any client in; give a token (at least "
            "16 characters from a secret manager), or leave it out and set public=True "
            "for an endpoint that accepts any bearer token"
        )
    if not _TOKEN_CHARS.fullmatch(text):
        raise ValueError(
            f"{field}: a token may hold only visible ASCII characters (no spaces, line "
            "breaks or non-ASCII), or it cannot travel in an Authorization header"
        )
    return value


#: The fields that choose and load the backend: fixed at start-up (a running server
#: cannot swap its models through ``POST /_local/config``).
BACKEND_FIELDS = (
    "backend",
    "models",
    "device",
    "dtype",
    "torch_compile",
    "batch_max_images",
    "offload",
    "lora_cache",
    "vae_cache",
    "controlnet_cache",
)
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


class FaultConfig(BaseModel):
    """Injected failures, each a fraction of the eligible requests (0 = never, 1 = always).

    One draw from a random generator seeded with ``seed`` decides the fate of each
    ``POST /generate/{engine}`` (and of polls and fetches when ``on_async_routes``), so
    the same sequence of requests meets the same faults on every run. Faulted requests
    never reach the renderer: they cost no paid generation, except ``drop_after_render``,
    which renders (and counts) the images and then drops the connection, the way a
    proxy timeout loses an answer that was already paid for.

    Examples:
        >>> FaultConfig(error_500=0.1, seed=7).total
        0.1
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_limited: float = Field(
        default=0.0, ge=0, le=1, description="Fraction answered 429 with Retry-After."
    )
    error_500: float = Field(default=0.0, ge=0, le=1, description="Fraction answered 500.")
    error_503: float = Field(default=0.0, ge=0, le=1, description="Fraction answered 503.")
    drop_connection: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Fraction whose connection is closed without an answer.",
    )
    drop_after_render: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Fraction rendered (and counted as paid) whose connection is then closed.",
    )
    slow: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Fraction answered normally after an extra delay of slow_s.",
    )
    slow_s: float = Field(default=5.0, ge=0, description="Extra delay of a slow answer, seconds.")
    retry_after_s: int = Field(
        default=1, ge=0, description="Retry-After (seconds) sent with an injected 429."
    )
    job_failure: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Fraction of async jobs that run for job_failure_after_s and then fail.",
    )
    job_failure_after_s: float = Field(
        default=60.0,
        ge=0,
        description="How long a failing async job runs before it fails, seconds.",
    )
    on_async_routes: bool = Field(
        default=False,
        description="Also inject 429/500/503/drop/slow into polls and result fetches.",
    )
    seed: int = Field(default=0, description="Seed of the fault draws, for reproducible runs.")

    @property
    def total(self) -> float:
        """The fraction of requests that meet some request-level fault."""
        return round(
            self.rate_limited
            + self.error_500
            + self.error_503
            + self.drop_connection
            + self.drop_after_render
            + self.slow,
            12,
        )

    @model_validator(mode="after")
    def _fractions_fit(self) -> FaultConfig:
        if self.total > 1:
            raise ValueError(
                "faults: rate_limited + error_500 + error_503 + drop_connection + "
                f"drop_after_render + slow is {self.total}; it must be at most 1"
            )
        return self


class ServerConfig(BaseModel):
    """How the OctoAI-compatible server behaves.

    The defaults are an instant, fault-free, private server that keeps async results 24
    hours, like the hosted service. A server needs ``token`` (or ``public=True``, which
    accepts any non-empty bearer token) to start; each async result is readable only with
    the token that submitted it (or the admin token). The ``/_local`` control routes are
    off unless ``control_routes=True``, and then answer only ``admin_token``. Tokens are
    ``SecretStr`` so that they never show in a repr.

    Examples:
        >>> cfg = ServerConfig(token="t0k", latency_per_image_s=0.5, replicas=2)
        >>> cfg
        ServerConfig(token=SecretStr('**********'), ...)
        >>> cfg.replicas
        2
    """

    # A mistyped token must not be echoed back in a validation error.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    token: SecretStr | None = Field(
        default=None,
        description="The accepted bearer token (required unless public); never empty.",
    )
    extra_tokens: tuple[SecretStr, ...] = Field(
        default=(),
        description="More accepted tokens (one per team, or old and new during a rotation).",
    )
    public: bool = Field(
        default=False,
        description="Accept any non-empty bearer token (a public endpoint); off = private.",
    )
    forbidden_tokens: tuple[SecretStr, ...] = Field(
        default=(), description="Tokens answered 403 (known, but not allowed to generate)."
    )
    control_routes: bool = Field(
        default=False,
        description="Serve the /_local control routes (stats, request log, runtime config).",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="The token of the /_local control routes (required with them; never an API token).",
    )
    playground: bool = Field(default=True, description="Serve the web playground at /playground.")
    max_body_bytes: int = Field(
        default=16 * MIB,
        ge=1024,
        description="Largest synchronous request body, bytes; larger gets 413 before it is read.",
    )
    max_input_image_scale: float = Field(
        default=2.0,
        ge=1,
        le=8,
        description=(
            "Largest input image, as a multiple of the output's width and height (in pixels: "
            "the square of it); inputs are resized to the output size, so more is never used."
        ),
    )
    max_images: int = Field(
        default=16,
        ge=1,
        le=16,
        description="Most images one request may ask for (num_images, or a list of seeds).",
    )
    max_steps: int = Field(
        default=200, ge=1, le=200, description="Most diffusion steps one request may ask for."
    )
    max_megapixel_steps: float = Field(
        default=2000.0,
        gt=0,
        description=(
            "Most work one request may ask for: images x steps x megapixels, the SDXL "
            "refiner's steps counted again; past it a 422 before anything queues."
        ),
    )
    lora_cache: int = Field(
        default=8, ge=1, description="diffusers backend: LoRAs kept loaded per checkpoint (LRU)."
    )
    vae_cache: int = Field(
        default=2, ge=1, description="diffusers backend: VAEs kept loaded per device (LRU)."
    )
    controlnet_cache: int = Field(
        default=2, ge=1, description="diffusers backend: ControlNets kept loaded per device (LRU)."
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time a connection has to send a request's headers, seconds; then closed.",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time a request has to send its body, seconds, plus 1 s per min_body_rate bytes.",
    )
    min_body_rate: int = Field(
        default=MIB,
        ge=1,
        description="Bytes a second a client must send its body at, beyond body_timeout_s.",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Connections served at once; more are answered 503.",
    )
    latency_per_image_s: float = Field(
        default=0.0, ge=0, description="Time each image takes on a replica, seconds (0 = instant)."
    )
    replicas: int = Field(
        default=4, ge=1, le=1024, description="Generations that run at once; the rest queue."
    )
    max_queued_requests: int | None = Field(
        default=None,
        ge=0,
        description="Sync requests that may wait for a busy replica; more get 429. None = no bound.",
    )
    queue_retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After (seconds) of a 429 past max_queued_requests."
    )
    result_ttl_s: float = Field(
        default=DEFAULT_RESULT_TTL_S,
        gt=0,
        description="How long an async result is kept after it finishes, seconds (then 404).",
    )
    state_dir: str | None = Field(
        default=None,
        description="Directory of the durable async job store (records, inputs, results); "
        "'dagster-octoai serve' defaults to ~/.local/state/dagster-octoai/jobs. None (and no "
        "jobs_url) = in memory, lost with the process: for tests.",
    )
    jobs_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix of the durable async job store, shared by every "
        "server on it (credentials from the AWS default chain); wins over state_dir.",
    )
    jobs_endpoint_url: str | None = Field(
        default=None,
        description="The S3 endpoint of jobs_url (MinIO, SeaweedFS...); None = AWS.",
    )
    max_queued_jobs: int | None = Field(
        default=1000,
        ge=1,
        description="Async jobs this server may hold queued (pending); more get 429 with "
        "Retry-After. None = no bound.",
    )
    async_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A running job's lease, renewed by its server; a server that stops "
        "renewing it lost the job, which runs once more or fails.",
    )
    async_sweep_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="How often the job store is swept: pending jobs queued, lost ones "
        "retried or failed, expired ones deleted, seconds.",
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long running async jobs may take to finish before "
        "they go back to pending for the next server, seconds.",
    )
    async_queue_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="Minimum time an async job stays 'pending' before it runs, seconds.",
    )
    rate_limit_requests: int | None = Field(
        default=None,
        ge=1,
        description="Generate requests allowed per rate_limit_window_s; more get 429. None = no limit.",
    )
    rate_limit_window_s: float = Field(
        default=1.0, gt=0, description="The rate limit's sliding window, seconds."
    )
    banned_words: tuple[str, ...] = Field(
        default=("forbidden",),
        description="Prompt words answered with the Acceptable Use Policy 400 (case-insensitive).",
    )
    safety_trigger_word: str | None = Field(
        default="nsfw",
        description="A prompt with this word gets every image removed_for_safety (image_b64 null).",
    )
    detail: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Deterministic noise mixed into images (0..1) to make realistic payload sizes.",
    )
    async_body_limit_bytes: int = Field(
        default=10 * MIB,
        ge=1,
        description="Largest async request body, bytes (the seed: 10 MB); larger gets 413 unread.",
    )
    public_base_url: str | None = Field(
        default=None,
        description="Base of the absolute poll and response URLs; None = from the request's Host.",
    )
    faults: FaultConfig = Field(default_factory=FaultConfig, description="Injected failures.")
    backend: Literal["placeholder", "diffusers"] = Field(
        default="placeholder",
        description="What renders images: placeholder (pictures without model weights) or "
        "diffusers (Stable Diffusion with PyTorch; needs models).",
    )
    models: str | None = Field(
        default=None,
        description="diffusers backend: the model directory (see 'dagster-octoai tiny-models').",
    )
    device: tuple[str, ...] = Field(
        default=(),
        description="diffusers backend: devices (cpu, cuda, cuda:N, mps), one replica each; "
        "none = the first CUDA GPU, else the CPU.",
    )
    dtype: Literal["fp16", "bf16", "fp32"] | None = Field(
        default=None,
        description="diffusers backend: weight dtype; none = fp16 on CUDA, fp32 elsewhere.",
    )
    torch_compile: bool = Field(
        default=False,
        description="diffusers backend: torch.compile the UNet (slow first images, faster after).",
    )
    offload: bool = Field(
        default=False,
        description="diffusers backend: model CPU offload on CUDA devices (each model moves to "
        "the GPU while it runs): FLUX or SD3 on a GPU smaller than their weights, slower.",
    )
    batch_max_images: int = Field(
        default=1,
        ge=1,
        le=64,
        description="diffusers backend: batch waiting requests of the same settings into one "
        "call of up to this many images per device (1 = off; batching moves pixels slightly).",
    )

    @field_validator("device")
    @classmethod
    def _check_devices(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for device in value:
            if not _DEVICE.match(device):
                raise ValueError(
                    f"{device!r} is not a device; allowed: cpu, cuda, cuda:N (N = 0, 1, ...), mps"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"devices {list(value)} name one device twice")
        return value

    @model_validator(mode="after")
    def _backend_needs(self) -> ServerConfig:
        if self.backend == "diffusers" and not self.models:
            raise ValueError(
                "models: the diffusers backend needs a model directory "
                "(make one with 'dagster-octoai tiny-models DIR', or see docs/local-server.md)"
            )
        return self

    @field_validator("token", "admin_token")
    @classmethod
    def _token_is_usable(cls, value: SecretStr | None, info: Any) -> SecretStr | None:
        return _check_token(value, info.field_name)

    @field_validator("extra_tokens", "forbidden_tokens")
    @classmethod
    def _tokens_are_usable(cls, value: tuple[SecretStr, ...], info: Any) -> tuple[SecretStr, ...]:
        for token in value:
            _check_token(token, info.field_name)
        return value

    @model_validator(mode="after")
    def _admin_token_stands_apart(self) -> ServerConfig:
        if self.control_routes and self.admin_token is None:
            raise ValueError(
                "admin_token: the control routes need a token of their own; set admin_token "
                "(never the API token), or leave control_routes off"
            )
        if self.admin_token is not None:
            admin = self.admin_token.get_secret_value()
            if admin in {t.get_secret_value() for t in self.api_tokens()}:
                raise ValueError(
                    "admin_token: must differ from token and extra_tokens (an API client "
                    "must never reach the control routes)"
                )
        return self

    def api_tokens(self) -> tuple[SecretStr, ...]:
        """Every accepted API token: ``token`` first, then ``extra_tokens``."""
        return ((self.token,) if self.token is not None else ()) + self.extra_tokens

    def startup_problem(self) -> str | None:
        """Why this configuration cannot serve, or None (checked when a server starts)."""
        if not self.public and not self.api_tokens():
            return (
                "token: the server is private and has no token; set one (--token, "
                "OCTOAI_TOKEN or a config file), or set public (--public) to accept any "
                "bearer token"
            )
        return None

    def check_startable(self) -> None:
        """Raise :class:`StartupError` when this configuration cannot serve."""
        problem = self.startup_problem()
        if problem is not None:
            raise StartupError(problem)

    def token_value(self) -> str | None:
        """The accepted token in clear, for a client in the same test."""
        return None if self.token is None else self.token.get_secret_value()

    def admin_token_value(self) -> str | None:
        """The control routes' token in clear, for the harness that started the server."""
        return None if self.admin_token is None else self.admin_token.get_secret_value()

    def public_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready data, tokens left out."""
        data = self.model_dump(mode="json", exclude=_SECRET_FIELDS)
        data["token_set"] = self.token is not None
        data["extra_token_count"] = len(self.extra_tokens)
        data["forbidden_token_count"] = len(self.forbidden_tokens)
        data["admin_token_set"] = self.admin_token is not None
        return data

    def secret_dict(self) -> dict[str, Any]:
        """The whole configuration including tokens in clear: only for a child process's env."""
        data = self.model_dump(mode="json", exclude=_SECRET_FIELDS)
        data["token"] = self.token_value()
        data["admin_token"] = self.admin_token_value()
        for name in ("extra_tokens", "forbidden_tokens"):
            data[name] = [t.get_secret_value() for t in getattr(self, name)]
        return data

    def updated(self, changes: dict[str, Any]) -> ServerConfig:
        """A copy with ``changes`` applied and validated; ``faults`` may be a partial dict.

        Examples:
            >>> ServerConfig().updated({"faults": {"error_500": 0.5}}).faults.error_500
            0.5
        """
        data = self.secret_dict()
        for key, value in changes.items():
            if key == "faults" and isinstance(value, dict):
                data["faults"] = {**data["faults"], **value}
            elif isinstance(value, FaultConfig):
                data[key] = value.model_dump()
            elif isinstance(value, SecretStr):
                data[key] = value.get_secret_value()
            elif isinstance(value, tuple | list) and any(isinstance(v, SecretStr) for v in value):
                data[key] = [v.get_secret_value() if isinstance(v, SecretStr) else v for v in value]
            else:
                data[key] = value
        return ServerConfig.model_validate(data)


_SECRET_FIELDS = {"token", "extra_tokens", "forbidden_tokens", "admin_token"}
