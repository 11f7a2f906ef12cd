"""Video generation (``POST /generate/svd``): Stable Video Diffusion's request and answer.

OctoAI's ``VideoGenerationRequest`` animates one image into short clips; the rules here
are its published OpenAPI schema's (``octoml/fern-config``,
``fern/apis/image-gen/openapi/openapi.json``) and its SVD page's. As for images, the same
model validates the client's calls, the Dagster layer's config and the server's input.

Examples:
    >>> from PIL import Image
    >>> req = VideoGenerationRequest(image=Image.new("RGB", (64, 36)), seed=7, fps=6)
    >>> req.size, req.frame_rate, req.video_count
    ((1024, 576), 6, 1)
    >>> VideoGenerationRequest.build({"image": Image.new("RGB", (8, 8)), "motion_scale": 2})
    Traceback (most recent call last):
    ...
    dagster_octoai.api.errors.RequestValidationError: invalid video generation request: motion_scale: 2 is out of range; allowed: >= 0 and <= 1
"""

from __future__ import annotations

import binascii
import hashlib
import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from .errors import ImageDecodeError, ImageRemovedForSafetyError
from .images import decode_base64_image, image_size
from .models import (
    CallInfo,
    _b64decode,
    _coerce_image,
    _image_digest,
    _picture_of,
    _rule_error,
    _validation_error,
    check_seeds,
    validation_error,
)

__all__ = [
    "SVD_ENGINE",
    "SVD_FRAMES",
    "VIDEO_RESOLUTIONS",
    "GeneratedVideo",
    "VideoGenerationRequest",
    "VideoGenerationResponse",
    "VideoJob",
    "closest_resolution",
]

#: The engine path of ``POST /generate/{engine}`` for video.
SVD_ENGINE = "svd"
#: (width, height) pairs OctoAI's SVD supports (the OpenAPI's width and height fields).
VIDEO_RESOLUTIONS: tuple[tuple[int, int], ...] = ((1024, 576), (576, 1024), (768, 768))
#: Frames per clip: SVD 1.1's 25, which at the default 7 fps is OctoAI's "3-4 secs long video".
SVD_FRAMES = 25

# The OpenAPI defaults, applied by the server when a field is not sent.
DEFAULT_CFG_SCALE = 3.0
DEFAULT_CRF = 23
DEFAULT_FPS = 7
DEFAULT_MOTION_SCALE = 0.5
DEFAULT_NOISE_AUG = 0.02
DEFAULT_STEPS = 25


def closest_resolution(size: tuple[int, int]) -> tuple[int, int]:
    """The supported (width, height) nearest in aspect ratio to an image of ``size``.

    OctoAI: "If not provided, the output width will be inferred from the input 'image',
    and the closest resolution supported will be chosen."

    Examples:
        >>> closest_resolution((640, 480)), closest_resolution((300, 500))
        ((768, 768), (576, 1024))
    """
    width, height = size
    aspect = math.log(max(width, 1) / max(height, 1))
    return min(VIDEO_RESOLUTIONS, key=lambda wh: abs(math.log(wh[0] / wh[1]) - aspect))


class VideoGenerationRequest(BaseModel):
    """One video request (``POST /generate/svd``), validated before anything is sent.

    ``image`` accepts a ``PIL.Image``, bytes, a path or base64; the rest are OctoAI's
    fields, each ``None`` unless set (the server's defaults then apply: 25 steps,
    ``cfg_scale`` 3, 7 fps, ``motion_scale`` 0.5, ``noise_aug_strength`` 0.02,
    ``constant_rate_factor`` 23, the size nearest the image's aspect ratio).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    image: Annotated[str, _coerce_image("image")] = Field(
        default=..., repr=False, description="The image to animate, as base64."
    )
    cfg_scale: float | None = Field(
        default=None, gt=0, le=10, description="How closely to adhere to the image (default 3)."
    )
    constant_rate_factor: int | None = Field(
        default=None,
        ge=0,
        le=51,
        description="H.264 quality: 0 lossless, 23 the default, 51 the worst.",
    )
    fps: int | None = Field(default=None, ge=1, le=25, description="Playback frames per second.")
    width: int | None = Field(default=None, description="Output width (with height).")
    height: int | None = Field(default=None, description="Output height (with width).")
    motion_scale: float | None = Field(
        default=None, ge=0, le=1, description="How much motion: 0..1 (default 0.5)."
    )
    noise_aug_strength: float | None = Field(
        default=None, ge=0, le=1, description="Noise added to the image: 0..1 (default 0.02)."
    )
    num_videos: int | None = Field(default=None, gt=0, le=16, description="Videos: 1..16.")
    seed: int | list[int | None] | None = Field(
        default=None, description="A seed, or one per video (null: random); 0 <= seed < 2**32."
    )
    steps: int | None = Field(default=None, gt=0, le=50, description="Diffusion steps: 1..50.")

    _size: tuple[int, int] | None = PrivateAttr(None)

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | list[int | None] | None) -> int | list[int | None] | None:
        return check_seeds(value, "video")

    @model_validator(mode="after")
    def _check_rules(self) -> VideoGenerationRequest:
        problems: list[InitErrorDetails] = []
        if (self.width is None) != (self.height is None):
            missing = "height" if self.height is None else "width"
            problems.append(_rule_error(missing, "set width and height together, or neither", None))
        elif self.width is not None and (self.width, self.height) not in VIDEO_RESOLUTIONS:
            pairs = ", ".join(f"{w}x{h}" for w, h in VIDEO_RESOLUTIONS)
            problems.append(
                _rule_error(
                    "width",
                    f"{self.width}x{self.height} (width x height) is not supported; "
                    f"allowed: {pairs}",
                    self.width,
                )
            )
        if isinstance(self.seed, list) and len(self.seed) != self.video_count:
            problems.append(
                _rule_error(
                    "seed",
                    f"a list of {len(self.seed)} seeds needs num_videos={len(self.seed)} "
                    f"(num_videos is {self.video_count})",
                    self.seed,
                )
            )
        if problems:
            raise _validation_error(type(self).__name__, problems)
        return self

    # ---- construction ------------------------------------------------------------

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> VideoGenerationRequest:
        """Validate a JSON body as the server receives it (``image`` must be base64).

        Raises pydantic's ``ValidationError``.
        """
        return cls.model_validate(dict(body), context={"wire": True})

    @classmethod
    def build(
        cls, data: VideoGenerationRequest | Mapping[str, Any], **overrides: Any
    ) -> VideoGenerationRequest:
        """A request from a model or a plain dict, raising :class:`RequestValidationError`."""
        if isinstance(data, VideoGenerationRequest) and not overrides:
            return data
        raw = dict(
            data.model_dump(exclude_none=True) if isinstance(data, VideoGenerationRequest) else data
        )
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc, what="video generation request", model=cls) from None

    # ---- wire form and identity ------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """The JSON body: every set field."""
        return self.model_dump(mode="json", exclude_none=True)

    def wire_bytes(self) -> bytes:
        """The JSON body as sent (compact UTF-8)."""
        return json.dumps(self.to_wire(), separators=(",", ":"), ensure_ascii=False).encode()

    def fingerprint(self) -> str:
        """A stable SHA-256 of the request: same fingerprint, same videos for explicit seeds.

        The image counts by its picture (mode, size, pixels), not the bytes that carry it.
        """
        body = self.to_wire()
        body["image"] = _picture_of(body["image"])
        canon = json.dumps(
            {"engine": SVD_ENGINE, "body": body}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(canon.encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """The request without the image payload (its size and hash instead)."""
        out: dict[str, Any] = {"engine": SVD_ENGINE}
        for key, value in self.to_wire().items():
            out[key] = _image_digest(value) if key == "image" else value
        return out

    @property
    def image_bytes(self) -> bytes:
        """The input image's encoded bytes."""
        return decode_base64_image(self.image)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the videos: the set pair, or the one nearest the image's shape."""
        if self.width is not None and self.height is not None:
            return (self.width, self.height)
        if self._size is None:
            self._size = closest_resolution(image_size(self.image_bytes))
        return self._size

    @property
    def frame_rate(self) -> int:
        return self.fps if self.fps is not None else DEFAULT_FPS

    @property
    def video_count(self) -> int:
        return self.num_videos or 1

    @property
    def explicit_seeds(self) -> list[int] | None:
        """One seed per video when every seed is fixed, else ``None`` (some are random)."""
        if isinstance(self.seed, list):
            fixed = [s for s in self.seed if s is not None]
            return fixed if len(fixed) == len(self.seed) else None
        if self.seed is None or self.video_count > 1:
            return None
        return [self.seed]


class GeneratedVideo(BaseModel):
    """One video of an answer: base64 MP4 in ``video`` (``None`` when removed for safety)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    video: str | None = Field(default=None, repr=False)
    seed: int
    removed_for_safety: bool = False
    safety_score: float | None = None

    @property
    def data(self) -> bytes:
        """The MP4 bytes.

        Raises:
            ImageRemovedForSafetyError: the server removed this video.
            ImageDecodeError: the base64 is corrupt.
        """
        if self.video is None:
            raise ImageRemovedForSafetyError(
                f"video with seed {self.seed} was removed for safety; it has no bytes"
            )
        try:
            return _b64decode(self.video)
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError(f"video with seed {self.seed}: bad base64 ({exc})") from None

    @property
    def available(self) -> bool:
        return self.video is not None


class VideoGenerationResponse(BaseModel):
    """An answer of ``POST /generate/svd``: its videos, and the request that made them."""

    model_config = ConfigDict(extra="allow", frozen=True)

    videos: list[GeneratedVideo]
    prediction_time_ms: float

    _request: VideoGenerationRequest | None = PrivateAttr(None)
    _response_id: str | None = PrivateAttr(None)
    _call: CallInfo = PrivateAttr(default_factory=CallInfo)
    _reused: Any = PrivateAttr(None)

    def _attach(
        self,
        request: VideoGenerationRequest | None,
        *,
        response_id: str | None = None,
        call: CallInfo | None = None,
    ) -> VideoGenerationResponse:
        self._request = request
        self._response_id = response_id
        if call is not None:
            self._call = call
        return self

    def _reuse(self, request: VideoGenerationRequest, manifest: Any) -> VideoGenerationResponse:
        """Mark this answer as standing for a stored output's manifest (nothing generated)."""
        self._request = request
        self._reused = manifest
        return self

    @property
    def reused_manifest(self) -> Any:
        """The stored manifest a video IO manager found for this request, or None."""
        return self._reused

    @property
    def request(self) -> VideoGenerationRequest | None:
        return self._request

    @property
    def response_id(self) -> str | None:
        return self._response_id

    @property
    def call_info(self) -> CallInfo:
        return self._call

    @property
    def seeds(self) -> list[int]:
        return [v.seed for v in self.videos]


class VideoJob(BaseModel):
    """A submitted async video job: enough to poll, fetch or resubmit it. Holds no token."""

    model_config = ConfigDict(frozen=True)

    response_id: str
    poll_url: str
    request: VideoGenerationRequest
    submitted_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
