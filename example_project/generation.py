"""Product images with SDXL, and img2img, ControlNet and inpainting variations of them.

Each asset is built by :func:`dagster_octoai.assets.octoai_image_asset` from a request
template: the prompt is filled from the catalogue at run time, upstream images come
back from the ``images`` IO manager's ``load_input``, and the launchpad validates run
config with the same rules as the client. Every asset is partitioned by product, so a
batch is restartable per product; explicit seeds make each image reproducible and let
a re-run reuse what is already stored instead of paying for it again. The built-in
asset checks (no image removed for safety, sizes as requested, images decode) run on
every materialization.
"""

from __future__ import annotations

import io
from typing import Any

from dagster import AssetIn
from PIL import Image, ImageDraw

from dagster_octoai.assets import octoai_image_asset

from .catalogue import product_partitions

#: SDXL's smallest supported size (width, height): quick to render, store and load.
SDXL_SIZE = (640, 1536)
#: The image IO manager's resource key (S3 or a local directory, see definitions.py).
IMAGES_IO = "images"
GROUP = "products"

#: What every request shares. JPEG keeps the stored objects small.
BASE_REQUEST: dict[str, Any] = {
    "engine": "sdxl",
    "width": SDXL_SIZE[0],
    "height": SDXL_SIZE[1],
    "steps": 20,
    "cfg_scale": 7.5,
    "sampler": "DPM_PLUS_PLUS_2M_KARRAS",
    "negative_prompt": "blurry, text, watermark, people",
    "image_encoding": "jpeg",
}
CATALOGUE_IN = {"prompt_catalogue": AssetIn()}
UPSTREAM_IMAGES_IN = {**CATALOGUE_IN, "product_images": AssetIn()}


def lower_band_mask(size: tuple[int, int], fraction: float = 0.3) -> bytes:
    """A PNG inpainting mask: white (repaint) over the bottom ``fraction`` of the image.

    Examples:
        >>> from PIL import Image; import io
        >>> Image.open(io.BytesIO(lower_band_mask((64, 100)))).getpixel((0, 99))
        255
    """
    width, height = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((0, int(height * (1 - fraction)), width, height), fill=255)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


# --8<-- [start:product_images]
product_images = octoai_image_asset(
    "product_images",
    {**BASE_REQUEST, "seed": 1001},
    prompt_template="{prompt_catalogue[prompt]}",
    partitions_def=product_partitions,
    ins=CATALOGUE_IN,
    io_manager_key=IMAGES_IO,
    group_name=GROUP,
    description="The product shot: SDXL text-to-image from the catalogue's prompt.",
)
# --8<-- [end:product_images]

# --8<-- [start:product_watercolor]
product_watercolor = octoai_image_asset(
    "product_watercolor",
    {**BASE_REQUEST, "seed": 2002, "strength": 0.55},
    prompt_template="{prompt_catalogue[prompt]}, loose watercolour illustration",
    partitions_def=product_partitions,
    ins=UPSTREAM_IMAGES_IN,
    image_inputs={"init_image": "product_images"},
    io_manager_key=IMAGES_IO,
    group_name=GROUP,
    description="img2img: the stored product shot restyled as a watercolour, layout kept.",
)

# --8<-- [end:product_watercolor]

product_controlnet = octoai_image_asset(
    "product_controlnet",
    {
        **BASE_REQUEST,
        "engine": "controlnet-sdxl",
        "seed": 3003,
        "controlnet": "octoai:canny_sdxl",
        "controlnet_conditioning_scale": 0.8,
    },
    prompt_template="{prompt_catalogue[prompt]}, at night, neon rim light",
    partitions_def=product_partitions,
    ins=UPSTREAM_IMAGES_IN,
    image_inputs={"controlnet_image": "product_images"},
    # The edge map is made here with Pillow, so the control image is one we can inspect.
    local_edge_map=True,
    io_manager_key=IMAGES_IO,
    group_name=GROUP,
    description="ControlNet (SDXL, canny): a night scene that follows the product shot's edges.",
)

product_inpainted = octoai_image_asset(
    "product_inpainted",
    {
        **BASE_REQUEST,
        "seed": 4004,
        "mask_image": lower_band_mask(SDXL_SIZE),
        "strength": 0.9,
    },
    prompt_template="{prompt_catalogue[prompt]}, standing on polished white marble",
    partitions_def=product_partitions,
    ins=UPSTREAM_IMAGES_IN,
    image_inputs={"init_image": "product_images"},
    io_manager_key=IMAGES_IO,
    group_name=GROUP,
    description="Inpainting: only the band under the product is repainted, as marble.",
)

PRODUCT_ASSETS = [product_images, product_watercolor, product_controlnet, product_inpainted]
