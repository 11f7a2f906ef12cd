"""Run config for generation ops and assets, backed by :class:`ImageGenerationRequest`.

:class:`ImageGenerationConfig` mirrors the request's fields in the types Dagster's
config system knows, so the launchpad checks types and unknown keys before a run
starts. Every value (the engine, sampler and image encoding names included) is then
judged by :meth:`ImageGenerationRequest.build`, the same code as the client's and the
server's: at step start, before anything is sent, every bad field at once, each with
what is allowed. The names are plain strings in Dagster's schema on purpose: a
Dagster enum would refuse an unknown sampler without listing the samplers, and in a
separate round from the request model's errors.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

from dagster import Config
from pydantic import Field, ValidationError, field_validator, model_validator
from typing_extensions import Self

from .api.errors import RequestValidationError
from .api.models import IMAGE_FIELDS, Engine, ImageGenerationRequest, Sampler, validation_error

__all__ = ["ImageGenerationConfig"]

_ENGINES = ", ".join(e.value for e in Engine)
_SAMPLERS = ", ".join(s.value for s in Sampler)


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

    engine: str | None = Field(default=None, description=f"Engine: one of {_ENGINES}.")
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
    sampler: str | None = Field(
        default=None, description=f"{_describe('sampler')} One of {_SAMPLERS}."
    )
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
    image_encoding: str | None = Field(default=None, description=_describe("image_encoding"))
    log_prompt: bool | None = Field(default=None, description=_describe("log_prompt"))

    @field_validator("engine", "sampler", "image_encoding", mode="before")
    @classmethod
    def _enum_value(cls, value: Any) -> Any:
        # ``Engine.SD`` in Python reads as ``"sd"`` in run config.
        return value.value if isinstance(value, enum.Enum) else value

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any] | None) -> Self:
        """This config from an op's run config, every problem in one error.

        What factories call at step start: unset (``None``) values are dropped, and a
        config that breaks a rule of the API raises one :class:`RequestValidationError`
        naming every bad field with what is allowed, in plain words.

        Raises:
            RequestValidationError: the config breaks a rule; ``errors`` lists each field.

        Examples:
            >>> ImageGenerationConfig.from_run_config(
            ...     {"prompt": "a fox", "steps": 500, "sampler": "FAST"}
            ... )
            Traceback (most recent call last):
            ...
            dagster_octoai.api.errors.RequestValidationError: invalid image generation request: steps: 500 is out of range; allowed: 1..200; sampler: 'FAST' is not a sampler; allowed: DDIM, ...
        """
        try:
            return cls(**{k: v for k, v in dict(values or {}).items() if v is not None})
        except ValidationError as exc:
            raise _config_error(exc) from None

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
                if self.seed is not None:
                    continue  # both set: the validator reports it
                name = "seed"
            elif name in IMAGE_FIELDS:
                value = _image_ref(value)
            elif name == "transfer_images":
                value = {w: [_image_ref(v) for v in imgs] for w, imgs in value.items()}
            out[name] = value
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
        # What only the config can get wrong, reported with the request's own errors.
        problems: list[dict[str, str]] = []
        needs_prompt = (
            cls.template is None and self.prompt is None and "prompt" not in cls.runtime_fields
        )
        if needs_prompt:
            problems.append({"field": "prompt", "message": "required (what to draw)"})
        fields = self.overrides()
        if self.seed is not None and self.seeds is not None:
            problems.append(
                {
                    "field": "seeds",
                    "message": "set seed (one for the request) or seeds (one per image), not both",
                }
            )
        # Runtime placeholders only fill fields neither the template nor this config sets.
        base: dict[str, Any] = dict(cls.runtime_fields)
        if needs_prompt:
            base["prompt"] = "prompt"
        if cls.template is not None:
            tmpl = cls.template
            base.update(
                tmpl.model_dump(exclude_none=True)
                if isinstance(tmpl, ImageGenerationRequest)
                else dict(tmpl)
            )
        try:
            ImageGenerationRequest.build(base, **fields)
        except RequestValidationError as exc:
            problems.extend(exc.errors)
        if problems:
            text = "; ".join(f"{e['field']}: {e['message']}" for e in problems)
            raise RequestValidationError(f"invalid image generation request: {text}", problems)
        return self


def _config_error(exc: ValidationError) -> RequestValidationError:
    """One error from pydantic's: the request model's own errors unwrapped, field by field.

    The request rules raise :class:`RequestValidationError` inside this model's
    validator, which pydantic wraps as a value error of the whole model (no field, its
    own boilerplate); the original already names every field, so it is what is kept.
    """
    errors: list[dict[str, str]] = []
    # validation_error lists one entry per pydantic error, in the same order.
    for err, plain in zip(exc.errors(), validation_error(exc).errors, strict=True):
        inner = (err.get("ctx") or {}).get("error")
        errors.extend(inner.errors if isinstance(inner, RequestValidationError) else [plain])
    text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return RequestValidationError(f"invalid image generation request: {text}", errors)
