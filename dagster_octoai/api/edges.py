"""A local Canny edge map for ControlNet, made with OpenCV as ControlNet Canny models expect.

ControlNet engines condition on a control map. The server makes one itself when
``controlnet_preprocess`` is true (its default); :func:`edge_map` makes it here
instead, so the map is stored, inspected and reused, and the request sends
``controlnet_preprocess=False``. It is the seed's own recipe, ``cv2.Canny(img, 100,
200)`` on the picture resized to the output size, and the bundled server's diffusers
backend preprocesses with this same function: a map made here and one made there are
the same pixels. Needs OpenCV (``opencv-python-headless``, in the ``dagster`` and
``diffusion`` extras).
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from .images import ImageInput, to_base64 as _to_base64

__all__ = ["edge_map"]


def edge_map(
    image: ImageInput,
    *,
    low_threshold: int = 100,
    high_threshold: int = 200,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """A white-on-black Canny edge map of ``image``.

    Args:
        image: a ``PIL.Image``, encoded bytes, a path or a base64 string.
        low_threshold: Canny's lower hysteresis threshold (the seed uses 100).
        high_threshold: Canny's upper hysteresis threshold (the seed uses 200).
        size: (width, height) to resize the picture to before edge detection, e.g. the
            request's size (the seed resizes first, then runs Canny).

    Returns:
        An ``L``-mode (grayscale) image whose pixels are 0 or 255.

    Examples:
        >>> from PIL import Image, ImageDraw
        >>> im = Image.new("RGB", (64, 64), "black")
        >>> ImageDraw.Draw(im).rectangle((16, 16, 48, 48), fill="white")
        >>> edges = edge_map(im)
        >>> edges.mode, edges.getextrema()
        ('L', (0, 255))
    """
    for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if not 0 <= value <= 255 * 8:
            raise ValueError(f"{name}: {value} is out of range; allowed: 0..2040")
    if low_threshold > high_threshold:
        raise ValueError(
            f"low_threshold: {low_threshold} is above high_threshold {high_threshold}; "
            "the lower hysteresis threshold must not exceed the upper"
        )
    try:
        import cv2
        import numpy as np
    except ImportError as exc:
        raise ImportError(
            "edge_map needs OpenCV: pip install opencv-python-headless "
            "(or the 'dagster' extra of dagster-octoai)"
        ) from exc
    src = _open(image).convert("RGB")
    if size is not None and src.size != size:
        src = src.resize(size, Image.Resampling.BILINEAR)
    # Canny on the colour picture, as the seed's example runs it (OpenCV takes the
    # strongest channel's gradient, so the channel order does not matter).
    edges = cv2.Canny(np.asarray(src), low_threshold, high_threshold)
    return Image.fromarray(edges)


def _open(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    data = base64.b64decode(_to_base64(image, "controlnet_image"))
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
