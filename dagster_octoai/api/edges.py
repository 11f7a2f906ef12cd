"""A local Canny-like edge map for ControlNet, made with Pillow alone.

ControlNet engines condition on a control map. The server makes one itself when
``controlnet_preprocess`` is true (its default); :func:`edge_map` makes it here
instead, so the map is stored, inspected and reused, and the request sends
``controlnet_preprocess=False``. No OpenCV: grayscale, blur, edge filter, threshold.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image, ImageFilter

from .images import ImageInput, to_base64 as _to_base64

__all__ = ["edge_map"]


def edge_map(
    image: ImageInput,
    *,
    blur_radius: float = 1.5,
    threshold: int = 24,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """A white-on-black edge map of ``image``, like a Canny control map.

    Args:
        image: a ``PIL.Image``, encoded bytes, a path or a base64 string.
        blur_radius: Gaussian blur before edge detection; larger drops fine texture.
        threshold: edge strength (0..255) at or above which a pixel is an edge.
        size: resize the result to (width, height), e.g. the request's size.

    Returns:
        An ``L``-mode (grayscale) image whose pixels are 0 or 255.

    Examples:
        >>> from PIL import Image, ImageDraw
        >>> im = Image.new("RGB", (64, 64), "black")
        >>> ImageDraw.Draw(im).rectangle((16, 16, 48, 48), fill="white")
        >>> edges = edge_map(im)
        >>> edges.mode, sorted(set(edges.getdata()))
        ('L', [0, 255])
    """
    if not 0 <= threshold <= 255:
        raise ValueError(f"threshold: {threshold} is out of range; allowed: 0..255")
    if blur_radius < 0:
        raise ValueError(f"blur_radius: {blur_radius} must be >= 0")
    src = _open(image)
    gray = src.convert("L")
    if blur_radius:
        gray = gray.filter(ImageFilter.GaussianBlur(blur_radius))
    edges = gray.filter(ImageFilter.FIND_EDGES)
    # FIND_EDGES leaves a one-pixel frame of false edges where the kernel meets the border.
    edges = _clear_border(edges)
    out = edges.point(lambda v: 255 if v >= threshold else 0)
    if size is not None and out.size != size:
        out = out.resize(size, Image.Resampling.NEAREST)
    return out


def _open(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    data = base64.b64decode(_to_base64(image, "controlnet_image"))
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _clear_border(im: Image.Image) -> Image.Image:
    w, h = im.size
    if w < 3 or h < 3:
        return im
    inner = im.crop((1, 1, w - 1, h - 1))
    framed = Image.new("L", (w, h), 0)
    framed.paste(inner, (1, 1))
    return framed
