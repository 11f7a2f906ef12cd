"""What the local server does: latency, replicas, expiry, rate limit, faults, policy.

Every knob is a field of :class:`ServerConfig` (faults of :class:`FaultConfig`), so the
command line, the pytest fixtures and ``POST /_local/config`` change the same things.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = ["BACKEND_FIELDS", "FaultConfig", "ServerConfig"]

DEFAULT_RESULT_TTL_S = 24 * 3600.0  # the seed: async results are kept 24 hours

#: The fields that choose and load the backend: fixed at start-up (a running server
#: cannot swap its models through ``POST /_local/config``).
BACKEND_FIELDS = ("backend", "models", "device", "dtype", "torch_compile")
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
    """How the local OctoAI-compatible server behaves.

    The defaults are an instant, fault-free server that keeps async results 24 hours,
    like the hosted service. ``token=None`` accepts any bearer token (but still
    answers 401 without one); the token is a ``SecretStr`` so it never shows in a repr.

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
        default=None, description="The accepted bearer token; None accepts any non-empty token."
    )
    forbidden_tokens: tuple[SecretStr, ...] = Field(
        default=(), description="Tokens answered 403 (known, but not allowed to generate)."
    )
    latency_per_image_s: float = Field(
        default=0.0, ge=0, description="Time each image takes on a replica, seconds (0 = instant)."
    )
    replicas: int = Field(
        default=4, ge=1, le=1024, description="Generations that run at once; the rest queue."
    )
    result_ttl_s: float = Field(
        default=DEFAULT_RESULT_TTL_S,
        gt=0,
        description="How long an async result is kept after it finishes, seconds (then 404).",
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
        default=10 * 1024 * 1024,
        ge=1,
        description="Largest async request body, bytes (the seed: 10 MB); larger gets 413.",
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

    def token_value(self) -> str | None:
        """The accepted token in clear, for a client in the same test."""
        return None if self.token is None else self.token.get_secret_value()

    def public_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready data, tokens left out."""
        data = self.model_dump(mode="json", exclude={"token", "forbidden_tokens"})
        data["token_set"] = self.token is not None
        data["forbidden_token_count"] = len(self.forbidden_tokens)
        return data

    def secret_dict(self) -> dict[str, Any]:
        """The whole configuration including tokens in clear: only for a child process's env."""
        data = self.model_dump(mode="json", exclude={"token", "forbidden_tokens"})
        data["token"] = self.token_value()
        data["forbidden_tokens"] = [t.get_secret_value() for t in self.forbidden_tokens]
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
            else:
                data[key] = value
        return ServerConfig.model_validate(data)
