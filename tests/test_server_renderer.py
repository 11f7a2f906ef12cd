"""The renderer's generation modes, checked on pixels of images served over HTTP.

PNG answers keep the pixels exact, so "unchanged outside the mask" can be asserted
with equality rather than a tolerance.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops, ImageStat

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.server import sample_image_b64

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., LocalOctoAIServer]
SIZE = (512, 512)


@pytest.fixture
def generate(octoai_server: LocalOctoAIServer) -> Iterator[Callable[..., Image.Image]]:
    headers = {"Authorization": f"Bearer {octoai_server.token}"}
    with httpx.Client(base_url=octoai_server.url, headers=headers, timeout=30) as client:

        def run(engine: str = "sd", **body: Any) -> Image.Image:
            body = {"prompt": "a test picture", "seed": 21, "image_encoding": "png", **body}
            r = client.post(f"/generate/{engine}", json=body)
            assert r.status_code == 200, r.text
            data = base64.b64decode(r.json()["images"][0]["image_b64"])
            image = Image.open(io.BytesIO(data))
            image.load()
            return image.convert("RGB")

        yield run


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def _mean_diff(
    a: Image.Image, b: Image.Image, box: tuple[int, int, int, int] | None = None
) -> float:
    diff = ImageChops.difference(a, b)
    if box is not None:
        diff = diff.crop(box)
    return sum(ImageStat.Stat(diff).mean) / 3


def test_img2img_blends_init_image_by_strength(generate: Callable[..., Image.Image]) -> None:
    init_b64 = sample_image_b64(SIZE, "photo")
    init = _decode(init_b64)
    plain = generate()
    diffs = [_mean_diff(generate(init_image=init_b64, strength=s), init) for s in (0.1, 0.5, 1.0)]
    assert diffs[0] < diffs[1] < diffs[2]
    assert diffs[0] < 15  # mostly the init image
    # strength 1 ignores init_image entirely, as in Stable Diffusion.
    assert _mean_diff(generate(init_image=init_b64, strength=1.0), plain) < 1


def test_init_image_is_resized_to_the_output_size(generate: Callable[..., Image.Image]) -> None:
    out = generate(init_image=sample_image_b64((128, 96), "photo"), strength=0.3)
    assert out.size == SIZE


def test_inpainting_paints_only_inside_the_mask(generate: Callable[..., Image.Image]) -> None:
    init_b64 = sample_image_b64(SIZE, "photo")
    init = _decode(init_b64)
    out = generate(init_image=init_b64, mask_image=sample_image_b64(SIZE, "mask"), strength=1.0)
    left, right = (0, 0, 256, 512), (256, 0, 512, 512)
    assert _mean_diff(out, init, right) == 0  # black: kept exactly
    assert _mean_diff(out, init, left) > 20  # white: painted


def test_outpainting_paints_the_transparent_frame(generate: Callable[..., Image.Image]) -> None:
    init_b64 = sample_image_b64(SIZE, "transparent")
    init = _decode(init_b64)
    out = generate(init_image=init_b64, outpainting=True)
    middle = (128, 128, 384, 384)
    assert _mean_diff(out, init, middle) == 0
    assert out.getpixel((20, 256)) != init.getpixel((20, 256))
    assert out.getpixel((256, 490)) != (0, 0, 0)


def test_controlnet_follows_the_edge_map(generate: Callable[..., Image.Image]) -> None:
    body = {
        "controlnet": "octoai:canny_sd15",
        "controlnet_image": sample_image_b64(SIZE, "edges"),
        "controlnet_preprocess": False,
    }
    out = generate("controlnet-sd15", **body).convert("L")
    # Scale 0: ControlNet has no say, the picture underneath.
    under = generate("controlnet-sd15", **body, controlnet_conditioning_scale=0.0).convert("L")
    # The map: a rectangle outline from (128,128) to (384,384) and the main diagonal.
    on_edges = [(128, 256), (384, 300), (256, 128), (300, 300), (200, 200)]
    off_edges = [(256, 200), (60, 300), (450, 200), (300, 250)]
    assert all(out.getpixel(p) < 40 for p in on_edges)  # type: ignore[operator]
    assert all(out.getpixel(p) == under.getpixel(p) for p in off_edges)
    assert _mean_diff(out.convert("RGB"), under.convert("RGB")) > 1


def test_controlnet_preprocess_finds_the_edges_of_a_picture(
    generate: Callable[..., Image.Image],
) -> None:
    # The photo: a yellow square from (128,128) to (256,256) on blue.
    body = {"controlnet": "octoai:canny_sd15", "controlnet_image": sample_image_b64(SIZE, "photo")}
    out = generate("controlnet-sd15", **body).convert("L")
    assert out.getpixel((128, 190)) < 40  # type: ignore[operator]
    assert out.getpixel((256, 190)) < 40  # type: ignore[operator]
    plain = generate("controlnet-sd15", **body, controlnet_preprocess=False).convert("L")
    # Used as a map as is, the photo's bright yellow square is "edge" all over.
    assert plain.getpixel((190, 190)) < 40  # type: ignore[operator]
    assert out.getpixel((190, 190)) != plain.getpixel((190, 190))


def test_transfer_images_are_pasted_as_thumbnails(generate: Callable[..., Image.Image]) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(buf, format="PNG")
    sample = base64.b64encode(buf.getvalue()).decode()
    out = generate(prompt="a photo of sks dog", transfer_images={"sks": [sample]})
    side = 512 // 6
    margin = side // 16
    x0, y0 = 512 - margin - side, 512 - margin - side
    assert out.getpixel((x0 + side // 2, y0 + side * 3 // 4)) == (0, 255, 0)
    assert generate().getpixel((x0 + side // 2, y0 + side * 3 // 4)) != (0, 255, 0)


def test_prompt_and_seed_change_the_picture(generate: Callable[..., Image.Image]) -> None:
    base = generate()
    assert _mean_diff(base, generate(seed=22)) > 5
    assert _mean_diff(base, generate(prompt="another picture")) > 1
    assert _mean_diff(base, generate()) == 0


def test_detail_makes_realistic_payload_sizes(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(detail=0.7)
    r = httpx.post(
        f"{srv.url}/generate/sdxl",
        json={"prompt": "x", "seed": 1},
        headers={"Authorization": f"Bearer {srv.token}"},
        timeout=30,
    )
    size = len(base64.b64decode(r.json()["images"][0]["image_b64"]))
    assert 1_200_000 < size < 2_000_000
