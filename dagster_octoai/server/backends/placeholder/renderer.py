"""A deterministic stand-in for Stable Diffusion: pictures without model weights.

The picture is a function of the request and the seed only, so the same request and
seed give the same bytes, while a person can still tell images apart: the prompt, the
seed and the engine are drawn into each one. The generation modes leave visible,
testable traces: img2img blends ``init_image`` by ``strength``, inpainting paints only
inside the white of ``mask_image``, outpainting paints only the transparent (or
outside) area, ControlNet draws the edges of ``controlnet_image`` and photo merge
pastes the ``transfer_images`` as thumbnails.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import textwrap
import typing

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from ....api.images import decode_base64_image
from ....api.models import ImageGenerationRequest
from .. import JPEG_QUALITY, RenderedImage

__all__ = ["render", "render_image"]

# Below this gray level a ControlNet edge map pixel is background, not an edge.
EDGE_THRESHOLD = 40


def render(
    request: ImageGenerationRequest,
    seeds: list[int],
    *,
    safety_trigger_word: str | None = None,
    detail: float = 0.0,
) -> list[RenderedImage]:
    """Every image of a request, one per seed."""
    blocked = bool(safety_trigger_word) and _has_word(request.prompt, safety_trigger_word or "")
    out = []
    for seed in seeds:
        score = random.Random(seed).random() * 0.1
        if blocked:
            out.append(RenderedImage(None, seed, True, round(0.9 + score, 4)))
        else:
            data = render_image(request, seed, detail=detail)
            out.append(RenderedImage(data, seed, False, round(score, 4)))
    return out


def _has_word(text: str, word: str) -> bool:
    return word.lower() in text.lower()


def render_image(request: ImageGenerationRequest, seed: int, *, detail: float = 0.0) -> bytes:
    """The encoded image (JPEG or PNG, as ``image_encoding`` asks) for one seed.

    Examples:
        >>> req = ImageGenerationRequest(prompt="a red fox", engine="sd", seed=1)
        >>> render_image(req, 1) == render_image(req, 1)
        True
    """
    width, height = request.size
    picture = _generate(request, seed, width, height, detail)
    if request.controlnet_image is not None:
        picture = _apply_controlnet(request, picture)
    if request.transfer_images:
        _paste_transfer_images(request.transfer_images, picture)
    _draw_caption(request, seed, picture)
    # Last, so that everything generated (caption included) stays inside the painted area.
    if request.init_image is not None:
        picture = _apply_init_image(request, picture)

    buf = io.BytesIO()
    if request.image_encoding == "png":
        # Level 1: PNG stays lossless, and big noisy images still encode in milliseconds.
        picture.save(buf, format="PNG", compress_level=1)
    else:
        # 4:4:4 chroma: noisy (detail > 0) images keep realistic multi-megabyte sizes.
        picture.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


# ---- the "generated" picture -----------------------------------------------------------


def _generate(
    request: ImageGenerationRequest, seed: int, width: int, height: int, detail: float
) -> Image.Image:
    picture = _background(width, height, seed, round(detail, 3)).copy()
    # The prompt picks the subject's colour and shape, the seed where it sits: two prompts
    # with one seed, or one prompt with two seeds, give visibly different images.
    digest = hashlib.sha256(request.prompt.encode()).digest()
    rng = random.Random(seed ^ int.from_bytes(digest[:4], "big"))
    color = (digest[4], digest[5], digest[6])
    draw = ImageDraw.Draw(picture)
    size = min(width, height)
    r = rng.randint(size // 6, size // 3)
    cx = rng.randint(r, width - r)
    cy = rng.randint(r, height - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if digest[7] % 3 == 0:
        draw.ellipse(box, fill=color, outline=(255, 255, 255), width=max(2, size // 128))
    elif digest[7] % 3 == 1:
        draw.rectangle(box, fill=color, outline=(255, 255, 255), width=max(2, size // 128))
    else:
        sides = 3 + digest[8] % 5
        draw.regular_polygon((cx, cy, r), sides, rotation=rng.randrange(360), fill=color)
    return picture


@functools.lru_cache(maxsize=32)
def _background(width: int, height: int, seed: int, detail: float) -> Image.Image:
    """The seed's backdrop: a two-colour gradient with a few shapes, plus optional noise.

    Cached because benchmarks ask for the same few sizes and seeds again and again;
    callers copy it before drawing, so the output stays deterministic.
    """
    rng = random.Random(seed)
    top = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    bottom = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    # A 256-step strip stretched with NEAREST: a gradient at a fraction of the cost of
    # resampling or colorizing a full-size ramp.
    strip = Image.frombytes(
        "RGB",
        (1, 256),
        bytes(a + (b - a) * i // 255 for i in range(256) for a, b in zip(top, bottom, strict=True)),
    )
    if rng.random() < 0.5:
        strip = strip.transpose(Image.Transpose.ROTATE_90)
    picture = strip.resize((width, height), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randint(min(width, height) // 20, min(width, height) // 6)
        fill = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    if detail > 0:
        # Seeded bytes, not Image.effect_noise: PIL's noise comes from the C library's
        # rand() and would break the same-seed-same-bytes promise.
        noise = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
        picture = Image.blend(picture, noise, detail)
    return picture


# ---- generation modes ------------------------------------------------------------------


def _open(b64: str, size: tuple[int, int], mode: str) -> Image.Image:
    """A wire image, converted to ``mode`` and stretched to the output size (as the API does)."""
    with Image.open(io.BytesIO(decode_base64_image(b64))) as im:
        im.load()
        converted = im.convert(mode)
    if converted.size != size:
        converted = converted.resize(size, Image.Resampling.BILINEAR)
    return converted


def _apply_init_image(request: ImageGenerationRequest, generated: Image.Image) -> Image.Image:
    assert request.init_image is not None
    size = generated.size
    init = _open(request.init_image, size, "RGBA")
    init_rgb = init.convert("RGB")
    strength = request.strength if request.strength is not None else 0.8
    # img2img: strength is how far the result departs from init_image (1 = ignore it).
    painted = Image.blend(init_rgb, generated, strength)

    if request.outpainting:
        paint_mask = _outpainting_mask(request, init, size)
        return Image.composite(generated, init_rgb, paint_mask)
    if request.mask_image is not None:
        paint_mask = _binary(_open(request.mask_image, size, "L"))
        return Image.composite(painted, init_rgb, paint_mask)
    return painted


def _outpainting_mask(
    request: ImageGenerationRequest, init: Image.Image, size: tuple[int, int]
) -> Image.Image:
    """Where outpainting paints: white where init_image is transparent or masked."""
    alpha = init.getchannel("A")
    lowest, _ = typing.cast(tuple[int, int], alpha.getextrema())
    if lowest < 255:
        return _binary(ImageOps.invert(alpha))
    if request.mask_image is not None:
        return _binary(_open(request.mask_image, size, "L"))
    # An opaque picture without a mask: keep it in the middle and paint a frame around it.
    width, height = size
    mask = Image.new("L", size, 255)
    ImageDraw.Draw(mask).rectangle(
        (width // 8, height // 8, width - width // 8 - 1, height - height // 8 - 1), fill=0
    )
    return mask


def _binary(gray: Image.Image) -> Image.Image:
    return gray.point(lambda v: 255 if v >= 128 else 0)


def _apply_controlnet(request: ImageGenerationRequest, generated: Image.Image) -> Image.Image:
    assert request.controlnet_image is not None
    control = _open(request.controlnet_image, generated.size, "L")
    preprocess = (
        request.controlnet_preprocess if request.controlnet_preprocess is not None else True
    )
    if preprocess:
        # What a canny preprocessor does, roughly: a picture becomes its edges.
        control = control.filter(ImageFilter.FIND_EDGES)
    edges = control.point(lambda v: 255 if v >= EDGE_THRESHOLD else 0)
    edges = edges.filter(ImageFilter.MaxFilter(3))
    scale = request.controlnet_conditioning_scale
    scale = 1.0 if scale is None else min(scale, 1.0)
    if request.controlnet_early_stop is not None:
        scale *= max(request.controlnet_early_stop, 0.25)
    strength = edges.point(lambda v: round(v * scale))
    ink = Image.new("RGB", generated.size, (16, 16, 16))
    return Image.composite(ink, generated, strength)


def _paste_transfer_images(transfer: dict[str, list[str]], picture: Image.Image) -> None:
    """Photo merge: each sample as a thumbnail in a strip along the bottom right."""
    width, height = picture.size
    side = max(32, min(width, height) // 6)
    margin = max(4, side // 16)
    x = width - margin - side
    y = height - margin - side
    draw = ImageDraw.Draw(picture)
    label_size = max(10, side // 8)
    for word in sorted(transfer):
        for b64 in transfer[word]:
            if x < 0:
                return
            thumb = _open(b64, (side, side), "RGB")
            picture.paste(thumb, (x, y))
            draw.rectangle((x, y, x + side - 1, y + side - 1), outline=(255, 255, 255), width=2)
            _put_text(picture, (x + 4, y + 2), word, label_size)
            x -= side + margin


# ---- the caption -----------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=256)
def _stamp(text: str, size: int) -> tuple[Image.Image, Image.Image]:
    """White text with a black outline as (colour, alpha), cached: outlined text is the
    slowest part of a small image, and prompts repeat across seeds and requests."""
    font = _font(size)
    stroke = max(1, size // 12)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    box = (int(right - left) + 2, int(bottom - top) + 2)
    alpha = Image.new("L", box, 0)
    color = Image.new("L", box, 0)
    origin = (-left + 1, -top + 1)
    ImageDraw.Draw(alpha).text(
        origin, text, font=font, fill=255, stroke_width=stroke, stroke_fill=255
    )
    ImageDraw.Draw(color).text(
        origin, text, font=font, fill=255, stroke_width=stroke, stroke_fill=0
    )
    return color.convert("RGB"), alpha


def _put_text(picture: Image.Image, xy: tuple[int, int], text: str, size: int) -> None:
    color, alpha = _stamp(text, size)
    picture.paste(color, xy, alpha)


def _draw_caption(request: ImageGenerationRequest, seed: int, picture: Image.Image) -> None:
    width, height = picture.size
    size = max(12, min(width, height) // 24)
    chars = max(12, int(width / (size * 0.55)))
    lines = textwrap.wrap(request.prompt, width=chars, max_lines=4, placeholder=" …")
    y = size // 2
    for line in lines:
        _put_text(picture, (size // 2, y), line, size)
        y += int(size * 1.25)
    facts = [request.engine.value, f"seed {seed}"]
    if request.sampler is not None:
        facts.append(request.sampler.value)
    if request.style_preset is not None:
        facts.append(request.style_preset)
    if request.init_image is not None:
        facts.append("inpaint" if request.mask_image is not None else "img2img")
    # The facts line changes with every seed, so it is plain text on a dark band (cheap)
    # rather than a cached outlined stamp.
    small = _font(max(10, size * 2 // 3))
    text = " · ".join(facts)
    x, y = size // 2, height - size * 3 // 2
    left, top, right, bottom = small.getbbox(text)
    draw = ImageDraw.Draw(picture)
    draw.rectangle((x + left - 3, y + top - 3, x + right + 3, y + bottom + 3), fill=(0, 0, 0))
    draw.text((x, y), text, font=small, fill=(255, 255, 255))
