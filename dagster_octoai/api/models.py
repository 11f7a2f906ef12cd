"""Request and answer models of the OctoAI image API: the one source of its rules.

The same :class:`ImageGenerationRequest` validates the Dagster launchpad's config,
the client's calls and the local server's input, so a request that the client
accepts is one the server accepts, and the other way round.
"""

from __future__ import annotations

import binascii
import difflib
import enum
import hashlib
import io
import json
import logging
import math
import re
import threading
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import pybase64
from PIL import Image
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import ImageDecodeError, ImageRemovedForSafetyError, RequestValidationError
from .images import (
    ImageFormat,
    content_type_for,
    decode_base64_image,
    image_size,
    picture_digest,
    sniff_format,
    to_base64,
)

__all__ = [
    "ASYNC_BODY_LIMIT_BYTES",
    "FLUX_RESOLUTIONS",
    "LIST_PRICES",
    "PREMIUM_SAMPLERS",
    "SD15_RESOLUTIONS",
    "SDXL_RESOLUTIONS",
    "STYLE_PRESETS",
    "AsyncJob",
    "CallInfo",
    "Engine",
    "GeneratedImage",
    "ImageGenerationRequest",
    "ImageGenerationResponse",
    "JobStatus",
    "PollResult",
    "PromptTooLongWarning",
    "Sampler",
    "count_prompt_tokens",
]

logger = logging.getLogger("dagster_octoai")

#: Async request bodies above this size are refused by the service (seed: 10 MB).
ASYNC_BODY_LIMIT_BYTES = 10 * 1024 * 1024
SEED_MAX = 2**32  # seeds are 0 <= seed < 2**32


def check_seeds(value: int | list[int | None] | None, output: str) -> int | list[int | None] | None:
    """A request's ``seed`` field checked: each seed in range, a list not empty.

    ``output``: what each seed makes ("image", "video"), for the error text.
    """
    seeds = value if isinstance(value, list) else [value]
    for s in seeds:
        if s is not None and not 0 <= s < SEED_MAX:
            raise ValueError(f"{s} is out of range; allowed: 0 <= seed < 2**32 ({SEED_MAX})")
    if isinstance(value, list) and not value:
        raise ValueError(f"a seed list needs one entry (int or null) per {output}")
    return value


class Engine(str, enum.Enum):
    """An image engine: the ``{engine}`` of ``POST /generate/{engine}``."""

    SDXL = "sdxl"
    SD = "sd"
    CONTROLNET_SDXL = "controlnet-sdxl"
    CONTROLNET_SD15 = "controlnet-sd15"
    SSD = "ssd"
    SD3 = "sd3"
    FLUX_SCHNELL = "flux-schnell"
    FLUX_DEV = "flux-dev"

    @classmethod
    def parse(cls, value: str | Engine) -> Engine:
        """The engine for a name, accepting the older SDK's ``controlnet-sd`` alias.

        Examples:
            >>> Engine.parse("controlnet-sd")
            <Engine.CONTROLNET_SD15: 'controlnet-sd15'>
        """
        if isinstance(value, Engine):
            return value
        name = _ENGINE_ALIASES.get(value, value)
        try:
            return cls(name)
        except ValueError:
            allowed = ", ".join(e.value for e in cls)
            raise ValueError(f"engine: {value!r} is not an engine; allowed: {allowed}") from None

    @property
    def is_sdxl(self) -> bool:
        """SDXL-family engines (SSD-1B is SDXL distilled) take the SDXL-only fields."""
        return self in (Engine.SDXL, Engine.CONTROLNET_SDXL, Engine.SSD)

    @property
    def is_controlnet(self) -> bool:
        return self in (Engine.CONTROLNET_SDXL, Engine.CONTROLNET_SD15)

    @property
    def is_flux(self) -> bool:
        return self in (Engine.FLUX_SCHNELL, Engine.FLUX_DEV)

    @property
    def refused_fields(self) -> frozenset[str]:
        """The fields OctoAI's OpenAPI marks "[Not supported on ...]" for this engine."""
        if self is Engine.SD3:
            return SD3_REFUSED_FIELDS
        if self.is_flux:
            return FLUX_REFUSED_FIELDS
        return frozenset()

    @property
    def resolutions(self) -> tuple[tuple[int, int], ...]:
        """Supported (width, height) pairs (OpenAPI: SD3, SSD as SDXL; FLUX its own list)."""
        if self.is_flux:
            return FLUX_RESOLUTIONS
        if self.is_sdxl or self is Engine.SD3:
            return SDXL_RESOLUTIONS
        return SD15_RESOLUTIONS

    @property
    def default_size(self) -> tuple[int, int]:
        """512x512 for SD 1.5, 1024x1024 for FLUX, SD3, SDXL and SSD (the OpenAPI)."""
        return (512, 512) if self in (Engine.SD, Engine.CONTROLNET_SD15) else (1024, 1024)

    @property
    def default_steps(self) -> int:
        """Steps when the request sets none: 4 for FLUX.1 [schnell], 30 for the others."""
        return 4 if self is Engine.FLUX_SCHNELL else 30

    @property
    def token_limit(self) -> int:
        """Prompt token limit: 77 for SDXL, 231 for SD 1.5; SD3 and FLUX read the prompt with
        T5 (256 tokens; 512 on FLUX.1 [dev]), CLIP taking its first 77."""
        if self is Engine.FLUX_DEV:
            return 512
        if self is Engine.SD3 or self is Engine.FLUX_SCHNELL:
            return 256
        return 77 if self.is_sdxl else 231

    @property
    def list_price(self) -> float | None:
        """OctoAI's published price of one default image (USD), or None where its pages
        give none: 1024x1024 at the default steps (30; schnell 4), without LoRAs."""
        return LIST_PRICES.get(self.value)


_ENGINE_ALIASES = {"controlnet-sd": "controlnet-sd15"}

SDXL_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (896, 1152), (832, 1216), (768, 1344), (640, 1536),
    (1536, 640), (1344, 768), (1216, 832), (1152, 896),
)  # fmt: skip
SD15_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (512, 512), (640, 512), (768, 512), (512, 704), (512, 768),
    (576, 768), (640, 768), (576, 1024), (1024, 576),
)  # fmt: skip
FLUX_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (512, 512), (576, 1024), (640, 1536), (768, 1024), (768, 1344),
    (832, 1216), (896, 1152), (1024, 576), (1024, 768), (1152, 896), (1216, 832),
    (1344, 768), (1536, 640),
)  # fmt: skip

# OctoAI's pricing page (fern/docs/getting-started/pricing-and-billing.mdx and the
# engines' pages): USD per 1024x1024 image at the default steps, by engine name (the
# ``prices`` of OctoAIResource take it as is). SSD and SD 1.5 had none.
LIST_PRICES: dict[str, float] = {
    "sdxl": 0.004,
    "controlnet-sdxl": 0.008,
    "sd3": 0.03,
    "flux-schnell": 0.002,
    "flux-dev": 0.02,
}


class Sampler(str, enum.Enum):
    """A sampler (scheduler). Premium samplers cost twice as much per image."""

    DDIM = "DDIM"
    DDPM = "DDPM"
    DPM_PLUS_PLUS_2M_KARRAS = "DPM_PLUS_PLUS_2M_KARRAS"
    DPM_SINGLE = "DPM_SINGLE"
    DPM_SOLVER_MULTISTEP = "DPM_SOLVER_MULTISTEP"
    K_EULER = "K_EULER"
    K_EULER_ANCESTRAL = "K_EULER_ANCESTRAL"
    PNDM = "PNDM"
    UNI_PC = "UNI_PC"
    # Premium (2x price) per the seed.
    DPM_2 = "DPM_2"
    DPM_2_ANCESTRAL = "DPM_2_ANCESTRAL"
    DPM_PLUS_PLUS_SDE_KARRAS = "DPM_PLUS_PLUS_SDE_KARRAS"
    HEUN = "HEUN"
    KLMS = "KLMS"
    # Listed by the octoai SDK only.
    LMS = "LMS"
    K_HEUN = "K_HEUN"
    DPM_PLUS_PLUS_2M_SDE = "DPM_PLUS_PLUS_2M_SDE"
    DPM_PLUS_PLUS_2M_SDE_KARRAS = "DPM_PLUS_PLUS_2M_SDE_KARRAS"
    DPM_2_KARRAS = "DPM_2_KARRAS"
    DPM_2_ANCESTRAL_KARRAS = "DPM_2_ANCESTRAL_KARRAS"
    LCM = "LCM"

    @property
    def is_premium(self) -> bool:
        return self in PREMIUM_SAMPLERS


# The SDK-only variants of a premium sampler (K_HEUN of HEUN, LMS of KLMS, the
# Karras DPM_2s) are counted premium too: a cost report should over- not under-state.
PREMIUM_SAMPLERS = frozenset(
    {
        Sampler.DPM_2,
        Sampler.DPM_2_ANCESTRAL,
        Sampler.DPM_PLUS_PLUS_SDE_KARRAS,
        Sampler.HEUN,
        Sampler.KLMS,
        Sampler.LMS,
        Sampler.K_HEUN,
        Sampler.DPM_2_KARRAS,
        Sampler.DPM_2_ANCESTRAL_KARRAS,
    }
)

STYLE_PRESETS: frozenset[str] = frozenset(
    """base|3d-model|analog-film|anime|cinematic|comic-book|Craft Clay|modeling-compound|
digital-art|enhance|fantasy-art|isometric|line-art|low-poly|neon-punk|origami|photographic|
pixel-art|tile-texture|Advertising|Food Photography|Real Estate|Abstract|Cubist|Graffiti|
Hyperrealism|Impressionist|Pointillism|Pop Art|Psychedelic|Renaissance|Steampunk|Surrealist|
Typography|Watercolor|Fighting Game|GTA|Super Mario|Minecraft|Pokémon|Retro Arcade|Retro Game|
RPG Fantasy Game|Strategy Game|Street Fighter|Legend of Zelda|Architectural|Disco|Dreamscape|
Dystopian|Fairy Tale|Gothic|Grunge|Horror|Minimalist|Monochrome|Nautical|Space|Stained Glass|
Techwear Fashion|Tribal|Zentangle|Collage|Flat Papercut|Kirigami|Paper Mache|Paper Quilling|
Papercut Collage|Papercut Shadow Box|Stacked Papercut|Thick Layered Papercut|Alien|Film Noir|
HDR|Long Exposure|Neon Noir|Silhouette|Tilt-Shift""".replace("\n", "").split("|")
)

# Fields that only SDXL-family engines take.
SDXL_ONLY_FIELDS = (
    "prompt_2",
    "negative_prompt_2",
    "style_preset",
    "use_refiner",
    "high_noise_frac",
)
# Fields that only ControlNet engines take.
CONTROLNET_FIELDS = (
    "controlnet",
    "controlnet_image",
    "controlnet_conditioning_scale",
    "controlnet_early_stop",
    "controlnet_preprocess",
)
IMAGE_FIELDS = ("init_image", "mask_image", "controlnet_image")
# The OpenAPI's "[Not supported on SD3, FLUX]" fields, and those of one of the two.
_NOT_ON_SD3_FLUX = frozenset(
    {
        "checkpoint",
        "clip_skip",
        *CONTROLNET_FIELDS,
        "high_noise_frac",
        "negative_prompt_2",
        "outpainting",
        "prompt_2",
        "sampler",
        "style_preset",
        "textual_inversions",
        "transfer_images",
        "use_refiner",
        "vae",
    }
)
SD3_REFUSED_FIELDS = _NOT_ON_SD3_FLUX | {"loras", "mask_image"}
FLUX_REFUSED_FIELDS = _NOT_ON_SD3_FLUX | {"negative_prompt"}

_ASSET_NAME = re.compile(r"^(octoai:)?[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


#: At most this many LoRAs / textual inversions in one request.
MAX_LORAS = 16
MAX_TEXTUAL_INVERSIONS = 16
#: A LoRA weight lies within -LORA_WEIGHT_BOUND..LORA_WEIGHT_BOUND (1 = the LoRA as trained).
LORA_WEIGHT_BOUND = 10.0


def _check_count(value: Mapping[str, Any], field: str, most: int) -> None:
    if len(value) > most:
        raise ValueError(f"{field}: {len(value)} names; at most {most} per request")


def _check_asset_name(value: str, field: str) -> str:
    if not _ASSET_NAME.match(value):
        raise ValueError(
            f"{field}: {value!r} is not an asset name; use 'octoai:<name>' for the public "
            "asset library or '<name>' for a private asset (letters, digits, '.', '_', '-')"
        )
    return value


# Prompt weighting, e.g. "(A tall (beautiful:1.5) woman:1.0)": brackets, colons and
# weights do not count towards the token limit.
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*\)")
_TOKEN = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def count_prompt_tokens(prompt: str) -> int:
    """An estimate of the prompt's CLIP token count, weighting syntax excluded.

    CLIP's tokenizer splits rare words into sub-word pieces; this counts a word as
    one token per 10 letters (CLIP's vocabulary holds common words whole) and every
    punctuation mark as one, which tracks CLIP within a few tokens for English
    prompts, close enough for a warning.

    Examples:
        >>> count_prompt_tokens("(A tall (beautiful:1.5) woman:1.0)")
        4
    """
    text = _WEIGHT.sub(" ", prompt).replace("(", " ").replace(")", " ")
    count = 0
    for tok in _TOKEN.findall(text):
        count += max(1, math.ceil(len(tok) / 10)) if tok.isalpha() else 1
    return count


class PromptTooLongWarning(UserWarning):
    """A prompt is over the engine's token limit: the model will ignore its tail."""


def _coerce_image(field: str) -> BeforeValidator:
    def convert(value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if _is_wire(info):
            return wire_image(value, field)
        return to_base64(value, field)

    return BeforeValidator(convert)


def _is_wire(info: ValidationInfo) -> bool:
    return isinstance(info.context, Mapping) and bool(info.context.get("wire"))


def wire_image(value: Any, field: str) -> str:
    """Check an image that came over the wire: base64 only, never a path on this machine."""
    if not isinstance(value, str):
        raise ValueError(
            f"{field}: expected a base64-encoded image string, got {type(value).__name__}"
        )
    try:
        data = decode_base64_image(value)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None
    if sniff_format(data) is None:
        try:
            image_size(data)
        except ValueError:
            raise ValueError(
                f"{field}: the base64 data is not an image (expected JPEG or PNG)"
            ) from None
    return value


Base64Image = Annotated[
    str, Field(description="An image as base64; also accepts PIL.Image, bytes or a path")
]


class ImageGenerationRequest(BaseModel):
    """One image generation request, validated before anything is sent.

    ``engine`` picks ``POST /generate/{engine}`` and the rules that apply; it is not
    part of the JSON body. Fields left ``None`` are not sent, so the server's
    defaults apply. Image fields accept a ``PIL.Image``, bytes, a path or base64.

    Examples:
        >>> req = ImageGenerationRequest(prompt="a red fox", steps=20, seed=7)
        >>> req.to_wire()
        {'prompt': 'a red fox', 'steps': 20, 'seed': 7}
        >>> ImageGenerationRequest.build({"prompt": "x", "engine": "sd", "width": 1024, "height": 1024})
        Traceback (most recent call last):
        ...
        dagster_octoai.api.errors.RequestValidationError: invalid image generation request: width: 1024x1024 ...
    """

    # allow_inf_nan=False: JSON has no Infinity or NaN, and json.dumps would send them as
    # bare words no strict server parses; refused here, naming the field.
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_enum_values=False, allow_inf_nan=False
    )

    engine: Engine = Field(
        default=Engine.SDXL,
        description=(
            "Engine: sdxl, sd, controlnet-sdxl, controlnet-sd15, ssd, sd3, flux-schnell, flux-dev."
        ),
    )
    prompt: str = Field(default=..., min_length=1, max_length=10_000, description="What to draw.")
    prompt_2: str | None = Field(
        default=None, max_length=10_000, description="SDXL only: a human-readable second prompt."
    )
    negative_prompt: str | None = Field(
        default=None, max_length=10_000, description="What to steer away from."
    )
    negative_prompt_2: str | None = Field(
        default=None, max_length=10_000, description="SDXL only: second negative prompt."
    )
    cfg_scale: float | None = Field(
        default=None,
        gt=0,
        le=50,
        description="Prompt adherence, > 0 and <= 50 (server default 12).",
    )
    steps: int | None = Field(
        default=None, gt=0, le=200, description="Diffusion steps, 1..200 (server default 30)."
    )
    num_images: int | None = Field(
        default=None, ge=1, le=16, description="Images to generate, 1..16 (default 1)."
    )
    seed: int | list[int | None] | None = Field(
        default=None,
        description="0 <= seed < 2**32; a list gives one seed (or null) per image; null picks at random.",
    )
    sampler: Sampler | None = Field(
        default=None, description="Sampler (default DDIM); premium samplers cost 2x."
    )
    width: int | None = Field(
        default=None, description="Output width; set with height to a supported pair."
    )
    height: int | None = Field(
        default=None, description="Output height; set with width to a supported pair."
    )
    style_preset: str | None = Field(default=None, description="SDXL only: a style preset name.")
    use_refiner: bool | None = Field(
        default=None, description="SDXL only: run the refiner (default true)."
    )
    high_noise_frac: float | None = Field(
        default=None, ge=0, le=1, description="SDXL only: base vs refiner split, 0..1."
    )
    checkpoint: str | None = Field(
        default=None,
        description="Checkpoint asset: 'octoai:<name>' (public) or '<name>' (private).",
    )
    vae: str | None = Field(default=None, description="VAE asset name.")
    loras: dict[str, float] | None = Field(
        default=None,
        description=f"LoRA asset name -> weight (-{LORA_WEIGHT_BOUND:g}..{LORA_WEIGHT_BOUND:g}); "
        f"at most {MAX_LORAS}.",
    )
    textual_inversions: dict[str, str] | None = Field(
        default=None,
        description="Textual inversion asset name -> trigger word; "
        f"at most {MAX_TEXTUAL_INVERSIONS}.",
    )
    init_image: Annotated[Base64Image | None, _coerce_image("init_image")] = Field(
        default=None, description="img2img / inpainting start image."
    )
    mask_image: Annotated[Base64Image | None, _coerce_image("mask_image")] = Field(
        default=None, description="Inpainting mask: white is painted."
    )
    strength: float | None = Field(
        default=None, gt=0, le=1, description="img2img noise, > 0 and <= 1 (default 0.8)."
    )
    outpainting: bool | None = Field(
        default=None, description="Outpaint the transparent / masked border of init_image."
    )
    inpaint_full_res: bool | None = Field(
        default=None, description="Inpaint the masked area at full resolution."
    )
    inpaint_full_res_padding: int | None = Field(
        default=None, ge=0, le=1024, description="Padding around the masked area, pixels."
    )
    transfer_images: dict[str, list[str]] | None = Field(
        default=None, description="Photo merge: trigger word -> sample images."
    )
    controlnet: str | None = Field(
        default=None,
        description="ControlNet engines: the ControlNet asset, e.g. 'octoai:canny_sdxl'.",
    )
    controlnet_image: Annotated[Base64Image | None, _coerce_image("controlnet_image")] = Field(
        default=None, description="ControlNet engines: the conditioning image."
    )
    controlnet_conditioning_scale: float | None = Field(
        default=None, ge=0, description="ControlNet strength, >= 0 (default 1)."
    )
    controlnet_early_stop: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Fraction of steps after which ControlNet stops, 0..1.",
    )
    controlnet_preprocess: bool | None = Field(
        default=None, description="Let the server make the control map (default true)."
    )
    clip_skip: int | None = Field(
        default=None, ge=1, le=12, description="CLIP layers to skip, 1..12."
    )
    image_encoding: Literal["jpeg", "png"] | None = Field(
        default=None, description="Output encoding: jpeg (default) or png."
    )
    log_prompt: bool | None = Field(default=None, description="Let the service log the prompt.")
    enable_safety: bool | None = Field(
        default=None, description="Sent by the older octoai-sdk; accepted."
    )

    # ---- field rules ---------------------------------------------------------------

    @field_validator("engine", mode="before")
    @classmethod
    def _parse_engine(cls, value: Any) -> Any:
        return Engine.parse(value) if isinstance(value, str) else value

    @field_validator("sampler", mode="before")
    @classmethod
    def _parse_sampler(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in Sampler.__members__.values():
            allowed = ", ".join(s.value for s in Sampler)
            raise ValueError(f"{value!r} is not a sampler; allowed: {allowed}")
        return value

    @field_validator("image_encoding", mode="before")
    @classmethod
    def _lower_encoding(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | list[int | None] | None) -> int | list[int | None] | None:
        return check_seeds(value, "image")

    @field_validator("style_preset")
    @classmethod
    def _check_style(cls, value: str | None) -> str | None:
        if value is not None and value not in STYLE_PRESETS:
            allowed = ", ".join(sorted(STYLE_PRESETS, key=str.lower))
            raise ValueError(f"{value!r} is not a style preset; allowed: {allowed}")
        return value

    @field_validator("checkpoint", "vae", "controlnet")
    @classmethod
    def _check_asset(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else _check_asset_name(value, info.field_name)

    @field_validator("loras")
    @classmethod
    def _check_loras(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        _check_count(value or {}, "loras", MAX_LORAS)
        for name, weight in (value or {}).items():
            _check_asset_name(name, "loras")
            if not math.isfinite(weight) or abs(weight) > LORA_WEIGHT_BOUND:
                raise ValueError(
                    f"loras: {name!r} has weight {weight:g}; allowed: "
                    f"-{LORA_WEIGHT_BOUND:g}..{LORA_WEIGHT_BOUND:g}"
                )
        return value

    @field_validator("textual_inversions")
    @classmethod
    def _check_tis(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        _check_count(value or {}, "textual_inversions", MAX_TEXTUAL_INVERSIONS)
        for name, trigger in (value or {}).items():
            _check_asset_name(name, "textual_inversions")
            if not trigger.strip():
                raise ValueError(f"textual inversion {name!r} needs a non-empty trigger word")
        return value

    @field_validator("transfer_images", mode="before")
    @classmethod
    def _encode_transfer(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError("must map each trigger word to a list of images")
        out: dict[str, list[str]] = {}
        for word, images in value.items():
            if not isinstance(word, str) or not word.strip():
                raise ValueError("trigger words must be non-empty strings")
            if not isinstance(images, list | tuple) or not images:
                raise ValueError(f"trigger word {word!r} needs a non-empty list of images")
            label = f"transfer_images[{word!r}]"
            out[word] = [
                wire_image(img, label) if _is_wire(info) else to_base64(img, label)
                for img in images
            ]
        return out

    # ---- rules across fields ---------------------------------------------------------

    @model_validator(mode="wrap")
    @classmethod
    def _check_rules(cls, data: Any, handler: Any) -> ImageGenerationRequest:
        """Field checks, then the rules across fields, every problem reported at once.

        Pydantic runs an ``after`` model validator only once every field is valid, so a
        bad prompt would hide a bad size until it was fixed. Here, when some fields
        fail, the rules still run on the fields that passed (those naming a failed
        field are left out, as they cannot be judged), and one error lists everything.
        """
        try:
            request: ImageGenerationRequest = handler(data)
        except ValidationError as exc:
            if not isinstance(data, Mapping):
                raise
            errors = exc.errors()
            failed = {str(e["loc"][0]) for e in errors if e["loc"]}
            rules = cls._rules_of_valid_fields(data, failed, handler)
            if not rules:
                raise
            raise _validation_error(
                cls.__name__, [*(_line_error(e) for e in errors), *rules]
            ) from None
        problems = request._rule_problems()
        if problems:
            raise _validation_error(
                cls.__name__,
                [_rule_error(field, msg, getattr(request, field)) for field, msg, _ in problems],
            )
        return request

    @classmethod
    def _rules_of_valid_fields(
        cls, data: Mapping[str, Any], failed: set[str], handler: Any
    ) -> list[InitErrorDetails]:
        # The rules all depend on the engine: with a bad engine none can be judged.
        if "engine" in failed:
            return []
        valid = {k: v for k, v in data.items() if k not in failed}
        # The prompt is never part of a rule; a stand-in keeps it from failing again.
        valid["prompt"] = "prompt"
        try:
            partial: ImageGenerationRequest = handler(valid)
        except ValidationError:
            return []
        return [
            _rule_error(field, msg, getattr(partial, field))
            for field, msg, involved in partial._rule_problems()
            if not involved & failed
        ]

    def _rule_problems(self) -> list[tuple[str, str, frozenset[str]]]:
        """Each broken rule across fields: (field named, message, every field it involves)."""
        engine = self.engine
        problems: list[tuple[str, str, frozenset[str]]] = []
        refused = engine.refused_fields
        for name in sorted(refused):
            if getattr(self, name) is not None:
                problems.append(
                    (
                        name,
                        f"not supported on engine {engine.value!r} (OctoAI's API refuses it "
                        f"there); leave it unset or use an engine that takes it",
                        frozenset({name, "engine"}),
                    )
                )
        if not engine.is_sdxl:
            for name in SDXL_ONLY_FIELDS:
                if name not in refused and getattr(self, name) is not None:
                    problems.append(
                        (
                            name,
                            f"only SDXL engines (sdxl, controlnet-sdxl) take it; "
                            f"engine {engine.value!r} does not",
                            frozenset({name, "engine"}),
                        )
                    )
        if engine.is_controlnet:
            for name in ("controlnet", "controlnet_image"):
                if getattr(self, name) is None:
                    problems.append(
                        (
                            name,
                            f"required on ControlNet engine {engine.value!r}",
                            frozenset({name, "engine"}),
                        )
                    )
        else:
            for name in CONTROLNET_FIELDS:
                if name not in refused and getattr(self, name) is not None:
                    problems.append(
                        (
                            name,
                            "only ControlNet engines (controlnet-sdxl, controlnet-sd15) "
                            f"take it; engine {engine.value!r} does not",
                            frozenset({name, "engine"}),
                        )
                    )
        size = frozenset({"width", "height"})
        if (self.width is None) != (self.height is None):
            missing = "height" if self.height is None else "width"
            problems.append((missing, "set width and height together, or neither", size))
        elif self.width is not None and (self.width, self.height) not in engine.resolutions:
            pairs = ", ".join(f"{w}x{h}" for w, h in engine.resolutions)
            problems.append(
                (
                    "width",
                    f"{self.width}x{self.height} (width x height) is not supported by "
                    f"engine {engine.value!r}; allowed: {pairs}",
                    size | {"engine"},
                )
            )
        if isinstance(self.seed, list) and len(self.seed) != (self.num_images or 1):
            problems.append(
                (
                    "seed",
                    f"a list of {len(self.seed)} seeds needs num_images={len(self.seed)} "
                    f"(num_images is {self.num_images or 1})",
                    frozenset({"seed", "num_images"}),
                )
            )
        if self.mask_image is not None and self.init_image is None:
            problems.append(
                (
                    "mask_image",
                    "inpainting needs init_image too",
                    frozenset({"mask_image", "init_image"}),
                )
            )
        if self.outpainting and self.init_image is None:
            problems.append(
                (
                    "outpainting",
                    "needs init_image (the picture to extend)",
                    frozenset({"outpainting", "init_image"}),
                )
            )
        return problems

    # ---- construction ------------------------------------------------------------

    @classmethod
    def from_wire(cls, body: Mapping[str, Any], engine: Engine | str) -> ImageGenerationRequest:
        """Validate a JSON body as the server receives it (images must be base64, never paths).

        Raises pydantic's ``ValidationError``; an ``engine`` key in the body is an unknown key.
        """
        if "engine" in body:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [InitErrorDetails(type="extra_forbidden", loc=("engine",), input=body["engine"])],
            )
        return cls.model_validate({**body, "engine": engine}, context={"wire": True})

    @classmethod
    def build(
        cls, data: ImageGenerationRequest | Mapping[str, Any], **overrides: Any
    ) -> ImageGenerationRequest:
        """A request from a model or a plain dict, raising :class:`RequestValidationError`.

        Examples:
            >>> ImageGenerationRequest.build({"prompt": "a fox"}, engine="sd").engine.value
            'sd'
        """
        if isinstance(data, ImageGenerationRequest) and not overrides:
            return data
        raw = dict(
            data.model_dump(exclude_none=True) if isinstance(data, ImageGenerationRequest) else data
        )
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def model_post_init(self, context: Any) -> None:
        tokens = count_prompt_tokens(self.prompt)
        if tokens > self.engine.token_limit:
            msg = (
                f"prompt: about {tokens} tokens, over the {self.engine.token_limit}-token limit "
                f"of engine {self.engine.value!r}; the model ignores the rest "
                "(weighting syntax like '(word:1.5)' is not counted)"
            )
            warnings.warn(msg, PromptTooLongWarning, stacklevel=2)

    # ---- wire form and identity ------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """The JSON body: every set field but ``engine``."""
        body = self.model_dump(mode="json", exclude_none=True, exclude={"engine"})
        return body

    def wire_bytes(self) -> bytes:
        """The JSON body as sent (compact UTF-8)."""
        return json.dumps(self.to_wire(), separators=(",", ":"), ensure_ascii=False).encode()

    def fingerprint(self) -> str:
        """A stable SHA-256 of the engine and body: same fingerprint, same images for explicit seeds.

        Image inputs count by their picture (mode, size, pixels), not by the bytes that
        carry it, so a mask passed as a PIL image, as PNG bytes or as a file gives the
        same fingerprint (:func:`~dagster_octoai.api.images.picture_digest`).
        """
        body = self.to_wire()
        for key in IMAGE_FIELDS:
            if key in body:
                body[key] = _picture_of(body[key])
        if "transfer_images" in body:
            body["transfer_images"] = {
                word: [_picture_of(v) for v in images]
                for word, images in body["transfer_images"].items()
            }
        canon = json.dumps(
            {"engine": self.engine.value, "body": body},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canon.encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """The request without image payloads (their sizes and hashes instead), for logs and metadata."""
        out: dict[str, Any] = {"engine": self.engine.value}
        for key, value in self.to_wire().items():
            if key in IMAGE_FIELDS:
                out[key] = _image_digest(value)
            elif key == "transfer_images":
                out[key] = {w: [_image_digest(v) for v in imgs] for w, imgs in value.items()}
            else:
                out[key] = value
        return out

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) the images will have: the set pair or the engine's default."""
        if self.width is not None and self.height is not None:
            return (self.width, self.height)
        return self.engine.default_size

    @property
    def image_count(self) -> int:
        return self.num_images or 1

    @property
    def explicit_seeds(self) -> list[int] | None:
        """One seed per image when every seed is fixed, else ``None`` (some are random)."""
        seeds = self.seed if isinstance(self.seed, list) else [self.seed] * self.image_count
        if any(s is None for s in seeds):
            return None
        if not isinstance(self.seed, list) and self.image_count > 1:
            # One int seed for several images: the service derives the others.
            return None
        return [s for s in seeds if s is not None]

    @property
    def is_premium(self) -> bool:
        """True when the sampler is premium (twice the price per image)."""
        return self.sampler is not None and self.sampler.is_premium


_PICTURES: dict[bytes, str] = {}
_PICTURES_LOCK = threading.Lock()
_PICTURES_MAX = 256


def _picture_of(b64: str) -> str:
    """``picture:<digest>`` of a base64 image, remembered by the hash of its base64.

    Decoding the pixels costs milliseconds; a batch fingerprints the same init image
    or mask once per request, so the digest is kept (a hash, not the image).
    """
    key = hashlib.sha256(b64.encode("ascii", "surrogateescape")).digest()
    with _PICTURES_LOCK:
        known = _PICTURES.get(key)
    if known is None:
        known = "picture:" + picture_digest(decode_base64_image(b64))
        with _PICTURES_LOCK:
            if len(_PICTURES) >= _PICTURES_MAX:
                _PICTURES.pop(next(iter(_PICTURES)))
            _PICTURES[key] = known
    return known


def _image_digest(b64: str) -> str:
    return (
        f"<image {len(b64) * 3 // 4} bytes sha256:{hashlib.sha256(b64.encode()).hexdigest()[:16]}>"
    )


def _rule_error(field: str, message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError("value_error", "{message}", {"message": message}),
        loc=(field,),
        input=value,
    )


def _line_error(error: Any) -> InitErrorDetails:
    """A pydantic error as reported, to be raised again beside others (type and text kept)."""
    # The context (bounds, expected values) is kept for the messages that read it.
    context = {k: v for k, v in (error.get("ctx") or {}).items() if k != "error"}
    return InitErrorDetails(
        type=PydanticCustomError(error["type"], "{message}", {**context, "message": error["msg"]}),
        loc=tuple(error["loc"]),
        input=error.get("input"),
    )


def _validation_error(title: str, errors: list[InitErrorDetails]) -> ValidationError:
    return ValidationError.from_exception_data(title, errors)


def validation_error(
    exc: ValidationError,
    *,
    what: str = "image generation request",
    model: type[BaseModel] | None = None,
) -> RequestValidationError:
    """A :class:`RequestValidationError` naming each field of a pydantic error.

    Every problem is listed, each as ``field: what is wrong; allowed: ...``, in plain
    words (no pydantic error codes or links).

    Examples:
        >>> try:
        ...     ImageGenerationRequest(prompt="a fox", steps=500, cfg_scale=0)
        ... except ValidationError as exc:
        ...     print(validation_error(exc))
        invalid image generation request: cfg_scale: 0 is out of range; allowed: > 0 and <= 50; steps: 500 is out of range; allowed: 1..200
    """
    errors = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "request"
        # Some rules name their field in their message already; the field is said once.
        message = _plain(err, model or ImageGenerationRequest).removeprefix(f"{field}: ")
        errors.append({"field": field, "message": message})
    text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return RequestValidationError(f"invalid {what}: {text}", errors)


_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})
_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping",
    "list": "a list",
}


def _plain(err: Any, model: type[BaseModel]) -> str:
    """One pydantic error in this package's words, with what is allowed where it is known."""
    kind: str = err["type"]
    msg: str = err["msg"]
    loc = err["loc"]
    top = str(loc[0]) if loc else ""
    field = model.model_fields.get(top)
    value = err.get("input")
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    if kind == "extra_forbidden" and len(loc) == 1:
        close = difflib.get_close_matches(top, model.model_fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown field; the API rejects keys it does not know{hint}"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r} (JSON has no Infinity or NaN); nothing was sent"
    if kind == "missing":
        about = (field.description or "").rstrip(".") if field else ""
        return f"required ({about[:1].lower()}{about[1:]})" if about else "required"
    if kind in _RANGE_ERRORS and field is not None and len(loc) == 1:
        return f"{value!r} is out of range; allowed: {_allowed_range(field)}"
    if kind == "string_too_short" and err.get("ctx", {}).get("min_length") == 1:
        return "must not be empty"
    if kind == "string_too_long":
        limit = err.get("ctx", {}).get("max_length")
        return f"{len(value)} characters; allowed: at most {limit}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{value!r} is not allowed; allowed: {expected.replace(' or ', ', ')}"
    for prefix, words in _TYPE_WORDS.items():
        if kind.startswith(f"{prefix}_") and kind.endswith(("_type", "_parsing")):
            return f"{value!r} is not {words}"
    return msg


def _allowed_range(field: Any) -> str:
    """The bounds of a numeric field, e.g. ``1..200`` or ``> 0 and <= 50``."""
    low: tuple[str, float] | None = None
    high: tuple[str, float] | None = None
    for bound in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">=")):
            if getattr(bound, attr, None) is not None:
                low = (op, getattr(bound, attr))
        for attr, op in (("lt", "<"), ("le", "<=")):
            if getattr(bound, attr, None) is not None:
                high = (op, getattr(bound, attr))
    integer = "int" in str(field.annotation)
    if integer and low is not None and high is not None:
        first = low[1] + 1 if low[0] == ">" else low[1]
        last = high[1] - 1 if high[0] == "<" else high[1]
        return f"{first:g}..{last:g}"
    parts = [f"{bound[0]} {bound[1]:g}" for bound in (low, high) if bound is not None]
    return " and ".join(parts) or "see the field's description"


# ---- answers ---------------------------------------------------------------------------


def _b64decode(value: str) -> bytes:
    """Strict base64 decode (any character outside the alphabet raises ``binascii.Error``).

    pybase64 (SIMD): CPython's decoder runs at about 100 MB/s on a busy 2-core box, about a
    third of the client's CPU per SDXL answer (benchmark P1).
    """
    return bytes(pybase64.b64decode(value, validate=True))


class GeneratedImage(BaseModel):
    """One image: of an answer the server sent, or loaded back from an image IO manager.

    An image of an answer holds the server's ``image_b64`` and decodes it lazily; a blocked
    one has ``image_b64=None`` and ``removed_for_safety``. An image an IO manager loads
    holds the stored bytes as they are (:meth:`from_bytes`: no base64 on the way) and says
    where they are: :attr:`uri`, :attr:`index` in the output's manifest,
    :attr:`partition_key` and the stored object's :attr:`metadata`. Either way
    :attr:`request` is the request that made it, and :attr:`response_id` the async job's
    id when it came through the async flow.

    Examples:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO()
        >>> Image.new("RGB", (8, 4)).save(buf, format="PNG")
        >>> image = GeneratedImage.from_bytes(buf.getvalue(), seed=7, uri="file:///tmp/a.png")
        >>> image.format, image.size, image.uri
        ('png', (8, 4), 'file:///tmp/a.png')
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    image_b64: str | None = Field(default=None, repr=False)
    seed: int
    removed_for_safety: bool = False
    safety_score: float | None = None

    _data: bytes | None = PrivateAttr(None)
    _request: ImageGenerationRequest | None = PrivateAttr(None)
    _response_id: str | None = PrivateAttr(None)
    _uri: str | None = PrivateAttr(None)
    _index: int | None = PrivateAttr(None)
    _partition_key: str | None = PrivateAttr(None)
    _metadata: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        seed: int,
        safety_score: float | None = None,
        request: ImageGenerationRequest | None = None,
        response_id: str | None = None,
        uri: str | None = None,
        index: int | None = None,
        partition_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> GeneratedImage:
        """An image from its encoded bytes (e.g. as stored), kept as they are.

        Raises:
            ImageDecodeError: the bytes are not JPEG, PNG, WebP or GIF.
        """
        if sniff_format(data) is None:
            where = uri or f"image with seed {seed}"
            raise ImageDecodeError(
                f"{where}: {len(data)} bytes that are not an image (start {data[:8]!r})"
            )
        image = cls(seed=seed, safety_score=safety_score)
        image._data = data
        image._request = request
        image._response_id = response_id
        image._uri = uri
        image._index = index
        image._partition_key = partition_key
        image._metadata = dict(metadata or {})
        return image

    @field_serializer("image_b64")
    def _dump_b64(self, value: str | None) -> str | None:
        # An image built from bytes is encoded only when it is dumped, never to be read.
        if value is None and self._data is not None:
            return pybase64.b64encode(self._data).decode("ascii")
        return value

    @property
    def data(self) -> bytes:
        """The image bytes as the server encoded them (or as they were stored).

        Raises:
            ImageRemovedForSafetyError: the server removed this image.
            ImageDecodeError: the base64 or the image is corrupt.
        """
        if self._data is None:
            if self.removed_for_safety or self.image_b64 is None:
                raise ImageRemovedForSafetyError(
                    f"image with seed {self.seed} was removed for safety; it has no bytes"
                )
            try:
                raw = _b64decode(self.image_b64)
            except (binascii.Error, ValueError) as exc:
                raise ImageDecodeError(
                    f"image with seed {self.seed}: invalid base64 ({exc})"
                ) from None
            if sniff_format(raw) is None:
                raise ImageDecodeError(
                    f"image with seed {self.seed}: {len(raw)} bytes that are not JPEG or PNG "
                    f"(start {raw[:8]!r})"
                )
            self._data = raw
        return self._data

    @property
    def available(self) -> bool:
        """False for an image removed for safety."""
        return not self.removed_for_safety and (
            self._data is not None or self.image_b64 is not None
        )

    @property
    def format(self) -> ImageFormat:
        """``jpeg`` or ``png`` as the server encoded it (``webp`` or ``gif`` once converted)."""
        fmt = sniff_format(self.data)
        assert fmt is not None  # data and from_bytes checked it
        return fmt

    @property
    def content_type(self) -> str:
        return content_type_for(self.format)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the image header."""
        try:
            return image_size(self.data)
        except ValueError as exc:
            raise ImageDecodeError(f"{self._where()}: {exc}") from None

    @property
    def request(self) -> ImageGenerationRequest | None:
        """The request that made this image (``None`` only where its answer has none)."""
        return self._request

    @property
    def response_id(self) -> str | None:
        """The async job's response id, when the image came through the async flow."""
        return self._response_id

    @property
    def uri(self) -> str | None:
        """Where an image IO manager stored it (``s3://...`` or ``file://...``); else ``None``."""
        return self._uri

    @property
    def index(self) -> int | None:
        """Its index in the stored output's manifest (``None`` for an image not loaded from one)."""
        return self._index

    @property
    def partition_key(self) -> str | None:
        """The partition of the output it was loaded from (``None``: unpartitioned, or not loaded)."""
        return self._partition_key

    @property
    def metadata(self) -> dict[str, Any]:
        """What the store recorded of a loaded image: the object metadata (seed, engine, run id...),
        ``sha256``, ``safety_score``, ``manifest_uri`` and ``run_id``; empty for an answer's image."""
        return dict(self._metadata)

    def _where(self) -> str:
        return self._uri or f"image with seed {self.seed}"

    def to_pil(self) -> Image.Image:
        """The image as a loaded ``PIL.Image`` (raises :class:`ImageDecodeError` if truncated)."""
        try:
            im = Image.open(io.BytesIO(self.data))
            im.load()
        except (OSError, SyntaxError) as exc:
            raise ImageDecodeError(f"{self._where()} does not decode: {exc}") from None
        return im

    def verify(self) -> None:
        """Decode the whole image once; raises :class:`ImageDecodeError` if it is corrupt."""
        self.to_pil().close()


class CallInfo(BaseModel):
    """What the client saw while making one call: for usage metadata and support tickets."""

    model_config = ConfigDict(frozen=True)

    attempts: int = 1
    request_ids: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    response_id: str | None = None

    @property
    def retries(self) -> int:
        return self.attempts - 1


class ImageGenerationResponse(BaseModel):
    """An answer: the images of one generation, and the request that produced it.

    As httpx's ``Response.request`` does, the answer knows what asked for it: the client
    and the session set :attr:`request` (and, for an async job, :attr:`response_id`), and
    an IO manager's :meth:`~dagster_octoai.S3ImageIOManager.find_existing` sets
    :attr:`reused_from` on a stored result it hands back instead of paying again. So an
    answer alone is enough to store the images with full lineage: return it from an asset.

    The images of an answer carry its request and response id too.

    Examples:
        >>> request = ImageGenerationRequest(prompt="a red fox", seed=7)
        >>> answer = ImageGenerationResponse(images=[], request=request)
        >>> answer.request.prompt, answer.response_id, answer.reused_from
        ('a red fox', None, None)
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    images: list[GeneratedImage]
    prediction_time_ms: float = 0.0

    _call: CallInfo = PrivateAttr(default_factory=CallInfo)
    _request: ImageGenerationRequest | None = PrivateAttr(None)
    _response_id: str | None = PrivateAttr(None)
    _reused_from: str | None = PrivateAttr(None)

    def __init__(
        self,
        /,
        *,
        request: ImageGenerationRequest | None = None,
        response_id: str | None = None,
        reused_from: str | None = None,
        call_info: CallInfo | None = None,
        **data: Any,
    ) -> None:
        super().__init__(**data)
        self._attach(request, response_id=response_id, reused_from=reused_from, call=call_info)

    def _attach(
        self,
        request: ImageGenerationRequest | None,
        *,
        response_id: str | None = None,
        reused_from: str | None = None,
        call: CallInfo | None = None,
    ) -> ImageGenerationResponse:
        """Set what produced this answer (the client's and the store's step after parsing)."""
        self._request = request
        self._response_id = response_id
        self._reused_from = reused_from
        if call is not None:
            self._call = call
        if request is None:
            return self
        for i, image in enumerate(self.images):
            if image._request is not None and image._request is not request:
                # Images of another answer: this one gets copies, theirs stay as they are.
                image = self.images[i] = image.model_copy()
            image._request = request
            image._response_id = response_id
        return self

    @property
    def request(self) -> ImageGenerationRequest | None:
        """The request this answer answers.

        ``None`` only for an answer fetched by a bare ``response_url``
        (``client.fetch(str)``), which says nothing of its request, or one built without it.
        """
        return self._request

    @property
    def response_id(self) -> str | None:
        """The async job's response id, when the answer came through the async flow."""
        return self._response_id

    @property
    def reused_from(self) -> str | None:
        """The manifest URI of the stored result this answer reuses (nothing was paid for it)."""
        return self._reused_from

    @property
    def call_info(self) -> CallInfo:
        """Attempts, request ids and elapsed time of the call that got this answer."""
        return self._call

    def with_call_info(self, call: CallInfo) -> ImageGenerationResponse:
        self._call = call
        return self

    @property
    def seeds(self) -> list[int]:
        return [im.seed for im in self.images]

    @property
    def removed_count(self) -> int:
        return sum(1 for im in self.images if not im.available)


class JobStatus(str, enum.Enum):
    """Async job status. ``failed`` and ``unknown`` are not documented but handled."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    #: Cancelled by its owner (``DELETE /v1/requests/{id}``); this package's server only.
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: Any) -> JobStatus:
        try:
            return cls(str(value).lower())
        except ValueError:
            return cls.UNKNOWN

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED)


class PollResult(BaseModel):
    """One poll answer: ``status`` as parsed, ``raw_status`` as sent."""

    model_config = ConfigDict(frozen=True)

    status: JobStatus
    raw_status: str
    response_url: str | None = None


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AsyncJob(BaseModel):
    """A submitted async job: enough to poll, fetch or resubmit it. Holds no token."""

    model_config = ConfigDict(frozen=True)

    response_id: str
    poll_url: str
    request: ImageGenerationRequest
    submitted_at: datetime = Field(default_factory=_utcnow)

    @property
    def engine(self) -> Engine:
        return self.request.engine
