"""The engines OctoAI's OpenAPI adds to SDXL and SD 1.5: ssd, sd3, flux-schnell, flux-dev.

Each field the OpenAPI marks "[Not supported on SD3, FLUX]" (or on one of them) is refused
naming the field and the engine: by the request model (so by the client, before sending)
and by the server. Resolutions and defaults are the OpenAPI's and the engines' pages'.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _scripted_server import ScriptedServer, module_scripted_server, ok, server
from PIL import Image

from dagster_octoai.api import errors
from dagster_octoai.api.client import AsyncOctoAIClient, HTTPRetryPolicy, OctoAIClient
from dagster_octoai.api.models import (
    FLUX_RESOLUTIONS,
    SDXL_RESOLUTIONS,
    Engine,
    ImageGenerationRequest,
)
from dagster_octoai.server import LocalOctoAIServer

__all__ = ["module_scripted_server", "server"]  # fixtures used by this module

pytestmark = pytest.mark.timeout(60)

TOKEN = "sk-engines-SECRET-0123456789"
FAST = HTTPRetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, deadline_s=30)


def _jpeg() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


# One value per field the OpenAPI annotates "[Not supported on SD3, FLUX]".
NOT_ON_SD3_FLUX: dict[str, Any] = {
    "checkpoint": "octoai:crystal-clear",
    "clip_skip": 2,
    "controlnet": "octoai:canny_sdxl",
    "controlnet_conditioning_scale": 0.5,
    "controlnet_early_stop": 0.5,
    "controlnet_image": _jpeg(),
    "controlnet_preprocess": False,
    "high_noise_frac": 0.5,
    "negative_prompt_2": "blurry",
    "outpainting": True,
    "prompt_2": "second",
    "sampler": "K_EULER",
    "style_preset": "anime",
    "textual_inversions": {"octoai:bad-hands": "bad-hands"},
    "transfer_images": {"frog": [_jpeg()]},
    "use_refiner": False,
    "vae": "octoai:vae-ft-mse",
}
REFUSED: dict[str, dict[str, Any]] = {
    "sd3": {**NOT_ON_SD3_FLUX, "loras": {"octoai:add-detail": 0.5}, "mask_image": _jpeg()},
    "flux-schnell": {**NOT_ON_SD3_FLUX, "negative_prompt": "blurry"},
    "flux-dev": {**NOT_ON_SD3_FLUX, "negative_prompt": "blurry"},
}
CASES = [(engine, name) for engine, fields in REFUSED.items() for name in fields]


def _body(engine: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a red fox", name: REFUSED[engine][name]}
    if name in ("mask_image", "outpainting"):
        body["init_image"] = _jpeg()  # so the field itself is the only problem
    return body


@pytest.mark.parametrize(("engine", "name"), CASES, ids=[f"{e}-{n}" for e, n in CASES])
def test_unsupported_field_refused_naming_field_and_engine(engine: str, name: str) -> None:
    with pytest.raises(errors.RequestValidationError) as info:
        ImageGenerationRequest.build(_body(engine, name), engine=engine)
    assert {e["field"] for e in info.value.errors} == {name}
    assert f"not supported on engine {engine!r}" in str(info.value)


def test_supported_fields_per_engine() -> None:
    init = _jpeg()
    sd3 = ImageGenerationRequest.build(
        {"prompt": "x", "negative_prompt": "blurry", "init_image": init, "strength": 0.5},
        engine="sd3",
    )
    assert sd3.negative_prompt == "blurry"
    for engine in ("flux-schnell", "flux-dev"):
        flux = ImageGenerationRequest.build(
            {
                "prompt": "x",
                "loras": {"octoai:tiny": 0.7},
                "init_image": init,
                "mask_image": init,
                "cfg_scale": 5.0,
            },
            engine=engine,
        )
        assert flux.loras == {"octoai:tiny": 0.7}
    # SSD-1B is SDXL distilled: the SDXL fields are its fields.
    ssd = ImageGenerationRequest.build(
        {"prompt": "x", "prompt_2": "y", "style_preset": "anime", "sampler": "K_EULER"},
        engine="ssd",
    )
    assert ssd.engine.is_sdxl and ssd.style_preset == "anime"


def test_resolutions_and_defaults() -> None:
    assert Engine.FLUX_SCHNELL.resolutions == FLUX_RESOLUTIONS
    for engine in ("sd3", "ssd"):
        assert Engine(engine).resolutions == SDXL_RESOLUTIONS
    ImageGenerationRequest.build({"prompt": "x", "width": 512, "height": 512}, engine="flux-dev")
    with pytest.raises(errors.RequestValidationError, match=r"512x512 .* engine 'sd3'"):
        ImageGenerationRequest.build({"prompt": "x", "width": 512, "height": 512}, engine="sd3")
    for engine in Engine:
        expected = (512, 512) if engine in (Engine.SD, Engine.CONTROLNET_SD15) else (1024, 1024)
        assert engine.default_size == expected
    assert Engine.FLUX_SCHNELL.default_steps == 4
    assert {e.default_steps for e in Engine if e is not Engine.FLUX_SCHNELL} == {30}
    # The pricing page's figures; SSD had none published.
    assert Engine.FLUX_SCHNELL.list_price == 0.002 and Engine.FLUX_DEV.list_price == 0.02
    assert Engine.SD3.list_price == 0.03 and Engine.SSD.list_price is None


# ---- the client refuses before sending; the server refuses the same ----------------------


def test_client_refuses_before_sending(server: ScriptedServer) -> None:
    server.script(ok(), ok())
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, timeout=10) as client:
        with pytest.raises(errors.RequestValidationError, match="negative_prompt"):
            client.generate({"prompt": "x", "negative_prompt": "y"}, engine="flux-schnell")
        with pytest.raises(errors.RequestValidationError, match="loras"):
            client.generate({"prompt": "x", "loras": {"a": 1.0}}, engine="sd3")
        assert server.requests == []
        client.generate({"prompt": "x", "loras": {"a": 1.0}}, engine="flux-dev")

    async def run_async() -> None:
        async with AsyncOctoAIClient(TOKEN, base_url=server.url, retry=FAST) as aclient:
            with pytest.raises(errors.RequestValidationError, match="sampler"):
                await aclient.generate({"prompt": "x", "sampler": "DDIM"}, engine="sd3")
            await aclient.generate({"prompt": "x"}, engine="ssd")

    asyncio.run(run_async())
    assert server.paths() == ["POST /generate/flux-dev", "POST /generate/ssd"]


@pytest.fixture
def http(octoai_server: LocalOctoAIServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {octoai_server.token}"}
    with httpx.Client(base_url=octoai_server.url, headers=headers, timeout=30) as c:
        yield c


@pytest.mark.parametrize(
    ("engine", "name"),
    [("sd3", "loras"), ("sd3", "mask_image"), ("flux-dev", "negative_prompt")]
    + [("flux-schnell", n) for n in NOT_ON_SD3_FLUX],
)
def test_server_refuses_the_same(http: httpx.Client, engine: str, name: str) -> None:
    response = http.post(f"/generate/{engine}", json=_body(engine, name))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [d["loc"] for d in detail] == [["body", name]]
    assert f"not supported on engine {engine!r}" in detail[0]["msg"]


@pytest.mark.parametrize("engine", ["ssd", "sd3", "flux-schnell", "flux-dev"])
def test_new_engines_routes_on_the_placeholder(http: httpx.Client, engine: str) -> None:
    response = http.post(f"/generate/{engine}", json={"prompt": "a fox", "seed": 3})
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    with Image.open(io.BytesIO(base64.b64decode(image["image_b64"]))) as im:
        assert im.size == (1024, 1024)


def test_list_prices_price_usage() -> None:
    from dagster_octoai.api.models import LIST_PRICES
    from dagster_octoai.metadata import image_cost
    from dagster_octoai.resources import OctoAIResource

    assert image_cost("flux-schnell", images=3, premium_images=0, prices=LIST_PRICES) == 0.006
    assert OctoAIResource(token="t", prices=LIST_PRICES).prices["sd3"] == 0.03


def test_launchpad_config_takes_the_same_rules() -> None:
    """The Dagster run config validates with the request model: the same refusals."""
    from dagster_octoai.config import ImageGenerationConfig

    config = ImageGenerationConfig(prompt="a fox", engine="flux-dev", loras={"tiny-flux": 0.5})
    assert config.to_request().engine is Engine.FLUX_DEV
    with pytest.raises(Exception, match=r"negative_prompt.*not supported on engine 'flux-dev'"):
        ImageGenerationConfig(prompt="a fox", engine="flux-dev", negative_prompt="blurry")
