"""What one request may cost: images, steps and their product with the output's size.

Checked before anything is queued or paid (sync and async alike); the limits are the
operator's (:class:`~.config.ServerConfig`: ``max_images``, ``max_steps``,
``max_megapixel_steps``, each a ``serve`` flag). A request's work is

    images x (steps + refiner steps) x megapixels

where the refiner's steps (``steps x (1 - high_noise_frac)``, rounded up) count for an
SDXL request that does not turn the refiner off: it is a second model over the image.
The defaults admit every example of OctoAI's documentation (at most 2 images of 20 steps
at 1024 x 1024 with the refiner: 84 megapixel-steps) and 16 images of the default 30
steps at 1024 x 1024 with the refiner (1,007); they refuse 16 x 200 with the refiner.
"""

from __future__ import annotations

import math

from ..api.models import ImageGenerationRequest
from .backends import Problem
from .config import ServerConfig

__all__ = ["DEFAULT_STEPS", "megapixel_steps", "over_budget"]

#: The steps of a request that names none (the service's default).
DEFAULT_STEPS = 30
_DEFAULT_HIGH_NOISE_FRAC = 0.8


def megapixel_steps(request: ImageGenerationRequest) -> float:
    """The request's work: images x (steps + refiner steps) x megapixels.

    Examples:
        >>> r = ImageGenerationRequest(prompt="x", width=1024, height=1024, steps=20)
        >>> round(megapixel_steps(r), 1)  # SDXL: the refiner's 4 steps count
        25.2
    """
    steps = request.steps or DEFAULT_STEPS
    width, height = request.size
    return request.image_count * (steps + _refiner_steps(request)) * width * height / 1e6


def _refiner_steps(request: ImageGenerationRequest) -> int:
    if not request.engine.is_sdxl or request.use_refiner is False:
        return 0
    frac = request.high_noise_frac
    frac = _DEFAULT_HIGH_NOISE_FRAC if frac is None else frac
    return math.ceil((request.steps or DEFAULT_STEPS) * (1 - frac) - 1e-9)


def over_budget(request: ImageGenerationRequest, config: ServerConfig) -> list[Problem]:
    """A 422 entry for each of the operator's limits the request goes past."""
    problems: list[Problem] = []
    images = request.image_count
    if images > config.max_images:
        problems.append(
            (
                ("num_images",),
                f"num_images: {images}; this server allows at most {config.max_images}",
            )
        )
    steps = request.steps or DEFAULT_STEPS
    if steps > config.max_steps:
        problems.append(
            (("steps",), f"steps: {steps}; this server allows at most {config.max_steps}")
        )
    work = megapixel_steps(request)
    counted = " (the SDXL refiner's steps counted)" if _refiner_steps(request) else ""
    if work > config.max_megapixel_steps:
        problems.append(
            (
                (),
                f"num_images x steps x megapixels: {work:,.0f} megapixel-steps{counted} is "
                "more than this server's "
                f"{config.max_megapixel_steps:,.0f}; ask for fewer images (num_images), fewer "
                "steps (steps), a smaller size (width, height) or no refiner (use_refiner)",
            )
        )
    return problems
