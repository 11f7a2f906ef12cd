"""Run config for generation ops and assets, backed by :class:`ImageGenerationRequest`.

:class:`ImageGenerationConfig` mirrors the request's fields in the types Dagster's
config system knows, so the launchpad checks types and enumerations (engine,
sampler, image encoding) before a run starts, and its validator builds the request
with :meth:`ImageGenerationRequest.build`, so every other rule of the API (bounds,
sizes per engine, SDXL-only and ControlNet fields, seeds per image) is checked by
the same code as the client's, naming the field, before anything is sent.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

from dagster import Config
from pydantic import Field, model_validator

from .api.models import Engine, ImageGenerationRequest, Sampler

__all__ = ["EngineName", "ImageEncoding", "ImageGenerationConfig"]

# Dagster config enums use member names as their values; these names are the API's
# own spellings, so run config reads `engine: controlnet-sdxl` as OctoAI's docs write it.
EngineName = enum.Enum(  # type: ignore[misc]
    "EngineName",
    {e.value: e.value for e in Engine},
)
EngineName.__doc__ = (
    "An engine name as the API spells it (sdxl, sd, controlnet-sdxl, controlnet-sd15)."
)

ImageEncoding = enum.Enum("ImageEncoding", {"jpeg": "jpeg", "png": "png"})
ImageEncoding.__doc__ = "Output image encoding."


def _describe(name: str, extra: str = "") -> str:
    base = ImageGenerationRequest.model_fields[name].description or name
    return f"{base} {extra}".strip()


_IMAGE_HELP = "Base64 image data, a local path, or a file:// URI."


def _image_ref(value: str) -> str:
    """A config image reference as ``to_base64`` takes it: file:// URIs become paths."""
    if value.startswith("file://"):
        return str(Path(unquote(urlparse(value).path)))
    return value


class ImageGenerationConfig(Config):
    """Run config for one image generation request, validated by the request model.

    Every field is optional in the launchpad: an asset built by
    :func:`~dagster_octoai.octoai_image_asset` fills the rest from its request
    template; used alone (in your own op or asset), ``prompt`` is required. Fields
    left unset are not sent, so the service's defaults apply. ``seed`` is one seed
    for the request, ``seeds`` one seed (or null for random) per image.

    Examples:
        >>> ImageGenerationConfig(prompt="a fox", steps=20, seed=7).to_request().to_wire()
        {'prompt': 'a fox', 'steps': 20, 'seed': 7}
        >>> ImageGenerationConfig(prompt="a fox", steps=500)
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for ImageGenerationConfig
        ...steps: Input should be less than or equal to 200...
    """

    #: The request this config overrides; set on the subclass a factory makes.
    template: ClassVar[ImageGenerationRequest | Mapping[str, Any] | None] = None
    #: Values used only to validate fields that arrive at run time (prompt from a
    #: template, images from upstream assets), so validation can judge the rest.
    runtime_fields: ClassVar[Mapping[str, Any]] = {}

    engine: EngineName | None = Field(default=None, description=_describe("engine"))
    prompt: str | None = Field(default=None, description=_describe("prompt"))
    prompt_2: str | None = Field(default=None, description=_describe("prompt_2"))
    negative_prompt: str | None = Field(default=None, description=_describe("negative_prompt"))
    negative_prompt_2: str | None = Field(default=None, description=_describe("negative_prompt_2"))
    cfg_scale: float | None = Field(default=None, description=_describe("cfg_scale"))
    steps: int | None = Field(default=None, description=_describe("steps"))
    num_images: int | None = Field(default=None, description=_describe("num_images"))
    seed: int | None = Field(
        default=None, description="One seed, 0 <= seed < 2**32; unset = random."
    )
    seeds: list[int | None] | None = Field(
        default=None,
        description="One seed (or null for random) per image; needs num_images to match.",
    )
    sampler: Sampler | None = Field(default=None, description=_describe("sampler"))
    width: int | None = Field(default=None, description=_describe("width"))
    height: int | None = Field(default=None, description=_describe("height"))
    style_preset: str | None = Field(default=None, description=_describe("style_preset"))
    use_refiner: bool | None = Field(default=None, description=_describe("use_refiner"))
    high_noise_frac: float | None = Field(default=None, description=_describe("high_noise_frac"))
    checkpoint: str | None = Field(default=None, description=_describe("checkpoint"))
    vae: str | None = Field(default=None, description=_describe("vae"))
    loras: dict[str, float] | None = Field(default=None, description=_describe("loras"))
    textual_inversions: dict[str, str] | None = Field(
        default=None, description=_describe("textual_inversions")
    )
    init_image: str | None = Field(default=None, description=_describe("init_image", _IMAGE_HELP))
    mask_image: str | None = Field(default=None, description=_describe("mask_image", _IMAGE_HELP))
    strength: float | None = Field(default=None, description=_describe("strength"))
    outpainting: bool | None = Field(default=None, description=_describe("outpainting"))
    inpaint_full_res: bool | None = Field(default=None, description=_describe("inpaint_full_res"))
    inpaint_full_res_padding: int | None = Field(
        default=None, description=_describe("inpaint_full_res_padding")
    )
    transfer_images: dict[str, list[str]] | None = Field(
        default=None, description=_describe("transfer_images", _IMAGE_HELP)
    )
    controlnet: str | None = Field(default=None, description=_describe("controlnet"))
    controlnet_image: str | None = Field(
        default=None, description=_describe("controlnet_image", _IMAGE_HELP)
    )
    controlnet_conditioning_scale: float | None = Field(
        default=None, description=_describe("controlnet_conditioning_scale")
    )
    controlnet_early_stop: float | None = Field(
        default=None, description=_describe("controlnet_early_stop")
    )
    controlnet_preprocess: bool | None = Field(
        default=None, description=_describe("controlnet_preprocess")
    )
    clip_skip: int | None = Field(default=None, description=_describe("clip_skip"))
    image_encoding: ImageEncoding | None = Field(
        default=None, description=_describe("image_encoding")
    )
    log_prompt: bool | None = Field(default=None, description=_describe("log_prompt"))

    def overrides(self) -> dict[str, Any]:
        """The fields set in this config, in the request model's terms."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, enum.Enum):
                value = value.value
            if name == "seeds":
                name = "seed"
            elif name in ("init_image", "mask_image", "controlnet_image"):
                value = _image_ref(value)
            elif name == "transfer_images":
                value = {w: [_image_ref(v) for v in imgs] for w, imgs in value.items()}
            out[name] = value
        if self.seed is not None and self.seeds is not None:
            raise ValueError(
                "seeds: set seed (one for the request) or seeds (one per image), not both"
            )
        return out

    def to_request(
        self,
        template: ImageGenerationRequest | Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> ImageGenerationRequest:
        """The request: ``template`` (or the class's), then this config, then ``overrides``.

        Raises:
            RequestValidationError: a field breaks a rule of the API; the message names it.
        """
        base = template if template is not None else type(self).template
        fields = {**self.overrides(), **{k: v for k, v in overrides.items() if v is not None}}
        if base is None:
            return ImageGenerationRequest.build(fields)
        return ImageGenerationRequest.build(base, **fields)

    @model_validator(mode="after")
    def _validate_request(self) -> ImageGenerationConfig:
        cls = type(self)
        if cls.template is None and self.prompt is None and "prompt" not in cls.runtime_fields:
            raise ValueError("prompt: required (what to draw)")
        # Runtime placeholders only fill fields neither the template nor this config sets.
        base: dict[str, Any] = dict(cls.runtime_fields)
        if cls.template is not None:
            tmpl = cls.template
            base.update(
                tmpl.model_dump(exclude_none=True)
                if isinstance(tmpl, ImageGenerationRequest)
                else dict(tmpl)
            )
        self.to_request(base)
        return self
