"""Stable Video Diffusion on the diffusers backend: ``POST /generate/svd`` from ``svd/base``.

Each of OctoAI's fields maps onto ``StableVideoDiffusionPipeline`` as its page defines it:

- ``motion_scale`` (0..1, how much motion) -> ``motion_bucket_id`` = ``motion_scale * 255``
  (SVD's conditioning range; the default 0.5 gives 127, SVD's own default);
- ``cfg_scale`` (how closely to adhere to the image, default 3) -> ``max_guidance_scale``:
  SVD's guidance rises linearly over the frames from ``min_guidance_scale`` (1, SVD's
  default) to it; a ``cfg_scale`` below 1 lowers both;
- ``fps`` -> the pipeline's ``fps`` conditioning and the encoder's playback rate;
- ``noise_aug_strength``, ``steps`` -> ``noise_aug_strength``, ``num_inference_steps``;
- ``constant_rate_factor`` -> the H.264 encoder's CRF (:mod:`dagster_octoai.server.mp4`);
- ``width``/``height`` -> the output size (else the one nearest the image's shape).

The frame count is the model's (``unet.config.num_frames``: 25 for SVD 1.1). One torch
generator per video, seeded with its seed on the CPU: same request and seed, same bytes.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from ....api.video import (
    DEFAULT_CFG_SCALE,
    DEFAULT_CRF,
    DEFAULT_MOTION_SCALE,
    DEFAULT_NOISE_AUG,
    DEFAULT_STEPS,
    VideoGenerationRequest,
)
from ...mp4 import encode_mp4
from .. import Backend

__all__ = ["SvdRenderer", "motion_bucket"]

#: SVD's micro-conditioning on motion: buckets 0..255.
_MOTION_BUCKETS = 255
_MIN_GUIDANCE = 1.0


def motion_bucket(motion_scale: float) -> int:
    """OctoAI's ``motion_scale`` (0..1) as SVD's ``motion_bucket_id`` (0..255).

    Examples:
        >>> motion_bucket(0.5), motion_bucket(0.0), motion_bucket(1.0)
        (127, 0, 255)
    """
    return int(motion_scale * _MOTION_BUCKETS)


class SvdRenderer:
    """``StableVideoDiffusionPipeline`` loaded once from a diffusers folder, on one device."""

    name = "diffusers"

    def __init__(self, path: Path, device: str, dtype: torch.dtype) -> None:
        from diffusers import StableVideoDiffusionPipeline

        self.path = path
        self.device = torch.device(device)
        self.pipe: Any = StableVideoDiffusionPipeline.from_pretrained(str(path), dtype=dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.frames = int(self.pipe.unet.config.num_frames)
        # The scheduler keeps per-call state: one clip at a time on this pipeline.
        self._lock = threading.Lock()

    @classmethod
    def for_backend(cls, backend: Backend) -> SvdRenderer | None:
        """The renderer of a diffusers backend's ``svd/base``, or None when it has none."""
        from .backend import _DTYPES, DiffusersBackend

        if not isinstance(backend, DiffusersBackend):
            return None
        path = backend.library.root / "svd" / "base"
        if not (path / "model_index.json").is_file():
            return None
        return cls(path, backend.device_names[0], _DTYPES[backend.dtype_name])

    def render_video(self, request: VideoGenerationRequest, seeds: list[int]) -> list[bytes]:
        width, height = request.size
        with Image.open(io.BytesIO(request.image_bytes)) as opened:
            still = ImageOps.fit(opened.convert("RGB"), (width, height))
        cfg = DEFAULT_CFG_SCALE if request.cfg_scale is None else request.cfg_scale
        motion = DEFAULT_MOTION_SCALE if request.motion_scale is None else request.motion_scale
        noise = (
            DEFAULT_NOISE_AUG if request.noise_aug_strength is None else request.noise_aug_strength
        )
        crf = DEFAULT_CRF if request.constant_rate_factor is None else request.constant_rate_factor
        clips = []
        for seed in seeds:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with self._lock, torch.inference_mode():
                frames = self.pipe(
                    still,
                    height=height,
                    width=width,
                    num_frames=self.frames,
                    num_inference_steps=request.steps or DEFAULT_STEPS,
                    min_guidance_scale=min(_MIN_GUIDANCE, cfg),
                    max_guidance_scale=cfg,
                    fps=request.frame_rate,
                    motion_bucket_id=motion_bucket(motion),
                    noise_aug_strength=noise,
                    decode_chunk_size=self.frames,
                    generator=generator,
                    output_type="pil",
                ).frames[0]
            clips.append(encode_mp4(frames, fps=request.frame_rate, crf=crf))
        return clips
