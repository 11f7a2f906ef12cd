"""The local OctoAI-compatible server for your own tests, and images to feed it.

Everything here is also available as pytest fixtures once dagster-octoai is installed
(``octoai_server``, ``octoai_server_factory``: see :mod:`dagster_octoai.testing.plugin`).

Examples:
    >>> from dagster_octoai.testing.server import LocalOctoAIServer, ServerConfig, sample_image_b64
    >>> with LocalOctoAIServer(ServerConfig(token="test-token-0c7f3e9a")) as srv:
    ...     srv.stats()["paid_generations"]
    0
    >>> sample_image_b64((64, 64), "edges")[:4]
    'iVBO'
"""

from __future__ import annotations

import base64
import io
from typing import Literal

from PIL import Image, ImageDraw

from ..server import FaultConfig, LocalOctoAIServer, ServerConfig

__all__ = [
    "TEST_ADMIN_TOKEN",
    "TEST_TOKEN",
    "FaultConfig",
    "LocalOctoAIServer",
    "ServerConfig",
    "sample_image_b64",
]

#: The token of the ``octoai_server`` fixture.
TEST_TOKEN = "test-token-0c7f3e9a"
#: The admin token of the fixtures' control routes.
TEST_ADMIN_TOKEN = "test-admin-token-4d2b8e61"

SampleImageKind = Literal["photo", "edges", "mask", "transparent"]


def sample_image_b64(size: tuple[int, int] = (512, 512), kind: SampleImageKind = "photo") -> str:
    """A small PNG as base64 for image fields of a request.

    ``photo``: a flat blue picture with a yellow square (``init_image``); ``edges``: white
    lines on black (a ControlNet map); ``mask``: white (paint) left half, black right half
    (``mask_image``); ``transparent``: an opaque middle in a transparent frame
    (``init_image`` for outpainting).
    """
    width, height = size
    if kind == "photo":
        im = Image.new("RGB", size, (30, 60, 200))
        ImageDraw.Draw(im).rectangle(
            (width // 4, height // 4, width // 2, height // 2), fill=(240, 220, 20)
        )
    elif kind == "edges":
        im = Image.new("RGB", size, (0, 0, 0))
        draw = ImageDraw.Draw(im)
        draw.rectangle(
            (width // 4, height // 4, 3 * width // 4, 3 * height // 4),
            outline=(255, 255, 255),
            width=3,
        )
        draw.line((0, 0, width - 1, height - 1), fill=(255, 255, 255), width=3)
    elif kind == "mask":
        im = Image.new("L", size, 0)
        ImageDraw.Draw(im).rectangle((0, 0, width // 2 - 1, height - 1), fill=255)
    elif kind == "transparent":
        im = Image.new("RGBA", size, (0, 0, 0, 0))
        ImageDraw.Draw(im).rectangle(
            (width // 4, height // 4, 3 * width // 4 - 1, 3 * height // 4 - 1),
            fill=(200, 40, 40, 255),
        )
    else:
        raise ValueError(
            f"kind: {kind!r} is not a sample image kind; allowed: photo, edges, mask, transparent"
        )
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
