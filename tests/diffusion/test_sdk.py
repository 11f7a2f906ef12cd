"""Conformance on the diffusers backend: OctoAI's own SDK (``octoai`` 1.11.0) generating.

The SDK is an independent client: if its typed methods and its generic ``infer`` work
against the diffusers backend, the backend speaks the real protocol, not just ours.
"""

from __future__ import annotations

import base64
import io

import pytest
from octoai.client import OctoAI
from octoai.image_gen.errors.unprocessable_entity_error import UnprocessableEntityError
from PIL import Image

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.server import sample_image_b64

pytestmark = pytest.mark.timeout(600)


def _pil(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_sdk_generates_sdxl_with_assets_through_the_diffusers_backend(sdk: OctoAI) -> None:
    response = sdk.image_gen.generate_sdxl(
        prompt="a lighthouse, (storm:1.2)",
        prompt2="an oil painting",
        sampler="DPM_PLUS_PLUS_2M_KARRAS",
        steps=2,
        seed=[100, 200],
        num_images=2,
        loras={"octoai:tiny-crayon": 0.7},
        vae="tiny-vae-sdxl",
        image_encoding="png",
    )
    assert [im.seed for im in response.images] == [100, 200]
    assert [im.removed_for_safety for im in response.images] == [False, False]
    first, second = (_pil(im.image_b64) for im in response.images)
    assert (first.format, first.size) == ("PNG", (1024, 1024))
    assert first.tobytes() != second.tobytes()
    assert response.prediction_time_ms > 0


def test_sdk_generates_sd15_img2img_through_infer(
    sdk: OctoAI, diffusers_server: LocalOctoAIServer
) -> None:
    answer = sdk.infer(
        f"{diffusers_server.url}/generate/sd",
        {
            "prompt": "a watercolour fox",
            "seed": 12,
            "steps": 2,
            "init_image": sample_image_b64((512, 512), "photo"),
            "strength": 0.6,
        },
    )
    assert answer["images"][0]["seed"] == 12
    assert _pil(answer["images"][0]["image_b64"]).size == (512, 512)


def test_sdk_sees_an_unknown_asset_as_its_own_422(sdk: OctoAI) -> None:
    with pytest.raises(UnprocessableEntityError) as caught:
        sdk.image_gen.generate_sdxl(prompt="x", steps=2, checkpoint="octoai:RealVisXL")
    detail = caught.value.body.detail  # type: ignore[union-attr]
    assert [list(d.loc) for d in detail] == [["body", "checkpoint"]]
