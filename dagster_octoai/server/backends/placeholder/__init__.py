"""The ``placeholder`` backend: deterministic pictures without model weights (the default).

See :mod:`dagster_octoai.server.backends.placeholder.renderer` for what it draws and how each mode shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import RenderedImage
from .renderer import render

if TYPE_CHECKING:
    from ....api.models import ImageGenerationRequest
    from ...config import ServerConfig
    from .. import Problem

__all__ = ["PlaceholderBackend"]


class PlaceholderBackend:
    """Draws every engine and mode (photo merge included); any asset name is accepted."""

    name = "placeholder"

    @property
    def replicas(self) -> int | None:
        return None

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "note": "deterministic placeholder pictures, no model weights",
        }

    def check(self, request: ImageGenerationRequest) -> list[Problem]:
        return []

    def render(
        self, request: ImageGenerationRequest, seeds: list[int], config: ServerConfig
    ) -> list[RenderedImage]:
        return render(
            request, seeds, safety_trigger_word=config.safety_trigger_word, detail=config.detail
        )

    def close(self) -> None:
        return None
