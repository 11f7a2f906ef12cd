"""Placeholder clips for ``POST /generate/svd``: the input image panning, no model weights.

Each clip has the frame count, size and frame rate a real SVD answer would have, and is
a function of the request and its seed alone: same request and seed, same bytes.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageOps

from ....api.video import DEFAULT_CRF, DEFAULT_MOTION_SCALE, SVD_FRAMES, VideoGenerationRequest
from ...mp4 import encode_mp4

__all__ = ["PlaceholderVideoRenderer"]


class PlaceholderVideoRenderer:
    """Pans the image by ``motion_scale`` with a marker whose path the seed picks."""

    name = "placeholder"

    def render_video(self, request: VideoGenerationRequest, seeds: list[int]) -> list[bytes]:
        width, height = request.size
        with Image.open(io.BytesIO(request.image_bytes)) as opened:
            still = ImageOps.fit(opened.convert("RGB"), (width, height))
        crf = request.constant_rate_factor
        return [
            encode_mp4(
                self._frames(still, request, seed),
                fps=request.frame_rate,
                crf=DEFAULT_CRF if crf is None else crf,
            )
            for seed in seeds
        ]

    @staticmethod
    def _frames(
        still: Image.Image, request: VideoGenerationRequest, seed: int
    ) -> list[Image.Image]:
        rng = random.Random(seed)
        width, height = still.size
        motion = DEFAULT_MOTION_SCALE if request.motion_scale is None else request.motion_scale
        step = max(1, round(motion * width / 100))
        x, y = rng.randrange(width), rng.randrange(height)
        dx, dy = rng.choice((-1, 1)) * step * 2, rng.choice((-1, 1)) * step
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        radius = max(4, min(width, height) // 24)
        frames = []
        for i in range(SVD_FRAMES):
            frame = still.transform(still.size, Image.Transform.AFFINE, (1, 0, i * step, 0, 1, 0))
            cx, cy = (x + i * dx) % width, (y + i * dy) % height
            ImageDraw.Draw(frame).ellipse(
                (cx - radius, cy - radius, cx + radius, cy + radius), fill=colour
            )
            frames.append(frame)
        return frames
