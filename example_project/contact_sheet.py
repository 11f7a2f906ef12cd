"""The contact sheet: a grid PNG of the latest images, one row per product, seeds captioned.

It is written to a local folder for people to open, and stored next to the images
(S3 or the local image store) so it has a URI like everything else.
"""

# No `from __future__ import annotations`: Dagster reads the context's annotation at definition time.
import hashlib
import io
from collections.abc import Mapping, Sequence

from dagster import (
    AssetExecutionContext,
    AssetIn,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)
from PIL import Image, ImageDraw, ImageFont

from dagster_octoai.api.images import thumbnail_data_uri
from dagster_octoai.api.models import GeneratedImage

from .generation import IMAGES_IO
from .settings import ExampleSettings

#: Column order of the sheet: the asset that made each column.
COLUMNS = ("product_images", "product_watercolor", "product_controlnet", "product_inpainted")
CELL_WIDTH = 200
CAPTION_HEIGHT = 34
LABEL_WIDTH = 150
PADDING = 8


def render_contact_sheet(
    rows: Mapping[str, Sequence[GeneratedImage | None]], columns: Sequence[str]
) -> bytes:
    """A PNG grid: a labelled row per product, a cell per column captioned with its seed.

    Args:
        rows: product -> one image (or ``None`` for a missing one) per column.
        columns: the column headings.

    Examples:
        >>> png = render_contact_sheet({"mug": [None]}, ["product_images"])
        >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    images = [im for row in rows.values() for im in row if im is not None]
    aspect = 1.0
    if images:
        w, h = images[0].to_pil().size
        aspect = h / w
    cell_h = int(CELL_WIDTH * aspect)
    width = LABEL_WIDTH + len(columns) * (CELL_WIDTH + PADDING) + PADDING
    header = 28
    row_h = cell_h + CAPTION_HEIGHT + PADDING
    height = header + len(rows) * row_h + PADDING
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, name in enumerate(columns):
        x = LABEL_WIDTH + PADDING + c * (CELL_WIDTH + PADDING)
        draw.text((x, 8), name, fill="black", font=font)
    for r, (product, cells) in enumerate(rows.items()):
        y = header + r * row_h
        draw.text((PADDING, y + cell_h // 2), product, fill="black", font=font)
        for c, stored in enumerate(cells):
            x = LABEL_WIDTH + PADDING + c * (CELL_WIDTH + PADDING)
            if stored is None:
                draw.rectangle((x, y, x + CELL_WIDTH, y + cell_h), outline="gray")
                draw.text((x + 8, y + 8), "missing", fill="gray", font=font)
                continue
            with stored.to_pil() as im:
                thumb = im.convert("RGB").resize((CELL_WIDTH, cell_h))
            sheet.paste(thumb, (x, y))
            draw.text((x, y + cell_h + 4), f"seed {stored.seed}", fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _latest(
    by_partition: Mapping[str, list[GeneratedImage]], product: str
) -> GeneratedImage | None:
    images = by_partition.get(product) or []
    return images[0] if images else None


@asset(
    group_name="reports",
    # Once a day, after every product's images were refreshed (needs the automation sensor).
    automation_condition=AutomationCondition.on_cron("0 7 * * *"),
    ins={name: AssetIn() for name in COLUMNS},
    required_resource_keys={IMAGES_IO},
    kinds={"pillow"},
    description="A grid PNG of the latest images of every product, each captioned with its seed.",
)
def contact_sheet(
    context: AssetExecutionContext,
    product_images: dict[str, list[GeneratedImage]],
    product_watercolor: dict[str, list[GeneratedImage]],
    product_controlnet: dict[str, list[GeneratedImage]],
    product_inpainted: dict[str, list[GeneratedImage]],
) -> MaterializeResult[None]:
    """Renders the sheet, writes it locally and stores it beside the images."""
    sources = (product_images, product_watercolor, product_controlnet, product_inpainted)
    products = sorted(product_images)
    rows = {p: [_latest(src, p) for src in sources] for p in products}
    png = render_contact_sheet(rows, COLUMNS)

    settings = ExampleSettings.from_env()
    path = settings.contact_sheet_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(png)
    tmp.replace(path)  # atomic: a reader never sees half a PNG

    # The image IO manager's store: the sheet lands under the same prefix as the images.
    store = getattr(context.resources, IMAGES_IO).store
    key = f"{store.output_key(list(context.asset_key.path), None)}/contact_sheet.png"
    seeds = {p: [c.seed if c is not None else None for c in cells] for p, cells in rows.items()}
    store.backend.put(
        key,
        png,
        "image/png",
        {"run-id": context.run_id, "products": str(len(products))},
    )
    uri = store.backend.uri(key)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "uri": MetadataValue.path(uri),
            "products": MetadataValue.int(len(products)),
            "seeds": MetadataValue.json(seeds),
            "sha256": MetadataValue.text(hashlib.sha256(png).hexdigest()),
            "preview": MetadataValue.md(f"![contact sheet]({thumbnail_data_uri(png, 320)})"),
        },
    )
