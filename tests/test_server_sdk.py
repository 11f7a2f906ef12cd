"""Conformance: OctoAI's own Python SDK (``octoai`` 1.11.0), unchanged, against the local server.

The SDK's typed ``image_gen`` methods send the token from ``api_key``; its generic
``infer`` / ``infer_async`` / ``get_future_result`` use the bare httpx client, so (as
with the hosted service) the token goes in that client's headers.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import httpx
import pytest
from octoai.client import OctoAI
from octoai.core.api_error import ApiError
from octoai.environment import OctoAIEnvironment
from octoai.image_gen.errors.unprocessable_entity_error import UnprocessableEntityError
from PIL import Image

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.server import sample_image_b64

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sdk(octoai_server: LocalOctoAIServer) -> Iterator[OctoAI]:
    env = OctoAIEnvironment(
        default=octoai_server.url, image_gen=octoai_server.url, text_gen=octoai_server.url
    )
    http = httpx.Client(headers={"Authorization": f"Bearer {octoai_server.token}"}, timeout=60)
    try:
        yield OctoAI(api_key=octoai_server.token, environment=env, httpx_client=http)
    finally:
        http.close()


def _pil(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_sdk_generates_sdxl(sdk: OctoAI, octoai_server: LocalOctoAIServer) -> None:
    before = octoai_server.stats()["paid_generations"]
    response = sdk.image_gen.generate_sdxl(
        prompt="a lighthouse at dusk",
        negative_prompt="fog",
        prompt2="oil painting",
        style_preset="cinematic",
        sampler="K_EULER_ANCESTRAL",
        steps=20,
        cfg_scale=7.5,
        num_images=2,
        seed=[100, 200],
        width=1152,
        height=896,
        image_encoding="png",
        use_refiner=False,
    )
    assert [im.seed for im in response.images] == [100, 200]
    assert [im.removed_for_safety for im in response.images] == [False, False]
    assert response.prediction_time_ms >= 0
    image = _pil(response.images[0].image_b64)
    assert image.format == "PNG"
    assert image.size == (1152, 896)
    assert octoai_server.stats()["paid_generations"] - before == 2


def test_sdk_generates_sd15_through_infer(sdk: OctoAI, octoai_server: LocalOctoAIServer) -> None:
    # octoai 1.11.0 has no typed SD 1.5 method; its generic infer() posts to any endpoint.
    answer = sdk.infer(
        f"{octoai_server.url}/generate/sd",
        {"prompt": "a watercolour fox", "seed": 12, "width": 512, "height": 768},
    )
    assert answer["images"][0]["seed"] == 12
    image = _pil(answer["images"][0]["image_b64"])
    assert (image.format, image.size) == ("JPEG", (512, 768))


def test_sdk_generates_controlnet_sdxl(sdk: OctoAI) -> None:
    response = sdk.image_gen.generate_controlnet_sdxl(
        prompt="a house made of glass",
        controlnet="octoai:canny_sdxl",
        controlnet_image=sample_image_b64((1024, 1024), "edges"),
        controlnet_conditioning_scale=0.9,
        controlnet_preprocess=False,
        seed=3,
    )
    image = _pil(response.images[0].image_b64)
    assert image.size == (1024, 1024)
    # The edge map's diagonal line shows through as dark ink; off the line it does not.
    gray = image.convert("L")
    assert gray.getpixel((500, 500)) < 60
    assert gray.getpixel((500, 700)) != gray.getpixel((500, 500))


def test_sdk_async_infer_poll_and_result(sdk: OctoAI, octoai_server: LocalOctoAIServer) -> None:
    future = sdk.infer_async(
        f"{octoai_server.url}/generate/sdxl", {"prompt": "a red fox", "seed": 77}
    )
    assert future.poll_url.startswith(f"{octoai_server.url}/v1/requests/")
    deadline = time.monotonic() + 30
    while not sdk.is_future_ready(future):
        assert time.monotonic() < deadline, "the async job never completed"
        time.sleep(0.05)
    result = sdk.get_future_result(future)
    assert result is not None
    assert result["images"][0]["seed"] == 77
    # The same request made synchronously gives the same bytes.
    sync = sdk.image_gen.generate_sdxl(prompt="a red fox", seed=77)
    assert result["images"][0]["image_b64"] == sync.images[0].image_b64


def test_sdk_reads_poll_answers_that_carry_queue_position(
    sdk: OctoAI, octoai_server: LocalOctoAIServer
) -> None:
    before = octoai_server.config.async_queue_delay_s
    octoai_server.configure(async_queue_delay_s=1.0)
    try:
        future = sdk.infer_async(f"{octoai_server.url}/generate/sd", {"prompt": "x", "seed": 3})
        headers = {"Authorization": f"Bearer {octoai_server.token}"}
        pending = httpx.get(future.poll_url, headers=headers, timeout=30).json()
        assert pending["status"] == "pending" and pending["queue_position"] == 0
        # The extra field changes nothing for the official SDK: not ready, then ready.
        assert sdk.is_future_ready(future) is False
        deadline = time.monotonic() + 30
        while not sdk.is_future_ready(future):
            assert time.monotonic() < deadline, "the async job never completed"
            time.sleep(0.05)
        result = sdk.get_future_result(future)
        assert result is not None and result["images"][0]["seed"] == 3
    finally:
        octoai_server.configure(async_queue_delay_s=before)


def test_sdk_sees_validation_errors_as_its_own_422_type(sdk: OctoAI) -> None:
    with pytest.raises(UnprocessableEntityError) as caught:
        sdk.image_gen.generate_sdxl(prompt="x", steps=500)
    detail = caught.value.body.detail  # type: ignore[union-attr]
    assert [list(d.loc) for d in detail] == [["body", "steps"]]


def test_sdk_sees_policy_and_auth_errors(octoai_server: LocalOctoAIServer, sdk: OctoAI) -> None:
    with pytest.raises(ApiError) as caught:
        sdk.image_gen.generate_sdxl(prompt="a forbidden thing")
    assert caught.value.status_code == 400
    assert caught.value.body == {"message": "This request violates our Acceptable Use Policy."}
    env = OctoAIEnvironment(
        default=octoai_server.url, image_gen=octoai_server.url, text_gen=octoai_server.url
    )
    with pytest.raises(ApiError) as caught:
        OctoAI(api_key="wrong", environment=env).image_gen.generate_sdxl(prompt="x")
    assert caught.value.status_code == 401
