"""What renders the images: the server's backends, chosen once at start-up.

The HTTP layer (routes, validation, seeds, the replica queue, async jobs, faults,
stats) is the same for every backend; a :class:`Backend` only turns a validated
request and its seeds into images. ``placeholder`` draws deterministic pictures
without model weights (the default, for tests and demos); ``diffusers`` runs Stable
Diffusion models with PyTorch. A backend's module is imported only when it is chosen,
so a placeholder server never imports torch.

Examples:
    >>> from dagster_octoai.server.config import ServerConfig
    >>> backend = load_backend(ServerConfig())
    >>> backend.name, backend.replicas
    ('placeholder', None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ...api.models import ImageGenerationRequest
    from ..config import ServerConfig

__all__ = [
    "BACKENDS",
    "JPEG_QUALITY",
    "Backend",
    "BackendError",
    "Problem",
    "RenderedImage",
    "load_backend",
]

#: The backends ``ServerConfig.backend`` may name.
BACKENDS = ("placeholder", "diffusers")

# What the diffusion extra installs (an ImportError of anything else is a bug, not a hint).
_DIFFUSION_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
    "peft",
    "torchsde",
    "cv2",
)

#: A 422 detail entry before ``"body"`` is prepended: (location, message).
Problem = tuple[tuple[str | int, ...], str]

#: The quality of every backend's JPEG answers (``image_encoding: jpeg``).
JPEG_QUALITY = 90


@dataclass(frozen=True)
class RenderedImage:
    """One image of an answer: encoded bytes, or ``None`` when removed for safety."""

    data: bytes | None
    seed: int
    removed_for_safety: bool
    safety_score: float


class BackendError(RuntimeError):
    """The backend cannot start: missing packages, a bad model directory, a bad device."""


@runtime_checkable
class Backend(Protocol):
    """Renders validated requests; one instance per server, built by :func:`load_backend`."""

    #: The backend's name, as ``ServerConfig.backend`` says it.
    name: str

    @property
    def replicas(self) -> int | None:
        """Generations that may run at once (one per device), or None: ``ServerConfig.replicas``."""
        ...

    def describe(self) -> dict[str, object]:
        """What this backend serves (devices, models, assets, what it ignores), JSON-ready."""
        ...

    def check(self, request: ImageGenerationRequest) -> list[Problem]:
        """Why this backend cannot serve ``request`` (unknown assets, unsupported fields).

        Called before the request queues for a replica; a non-empty answer is a 422.
        """
        ...

    def render(
        self, request: ImageGenerationRequest, seeds: list[int], config: ServerConfig
    ) -> list[RenderedImage]:
        """One image per seed. Called on a worker thread, at most ``replicas`` at once."""
        ...

    def close(self) -> None:
        """Free what the backend holds (models, devices); called when the server stops."""
        ...


def load_backend(config: ServerConfig) -> Backend:
    """The backend ``config.backend`` names, ready to render.

    Raises:
        BackendError: the backend cannot start (its packages are missing, the model
            directory is wrong, a device does not exist); the message says what to do.
    """
    if config.backend == "placeholder":
        from .placeholder import PlaceholderBackend

        return PlaceholderBackend()
    if config.backend == "diffusers":
        from .diffusers.library import ModelLibrary

        # The directory first (no torch needed): a wrong path fails in milliseconds.
        try:
            ModelLibrary(config.models or "")
        except (NotADirectoryError, FileNotFoundError) as exc:
            raise BackendError(f"models: {exc}") from exc
        try:
            from .diffusers.backend import DiffusersBackend
        except ImportError as exc:
            if not str(exc.name).startswith(_DIFFUSION_PACKAGES):
                raise
            raise BackendError(
                f"backend 'diffusers' needs the diffusion extra ({exc.name} is missing): "
                "pip install 'dagster-octoai[server,diffusion]' (on a GPU host, install the "
                "CUDA build of torch first: docs/local-server.md)"
            ) from exc
        return DiffusersBackend.from_config(config)
    allowed = ", ".join(BACKENDS)
    raise BackendError(f"backend: {config.backend!r} is not a backend; allowed: {allowed}")
