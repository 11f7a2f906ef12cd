"""FLUX.1 [schnell] / [dev], SD3 and SSD-1B over real HTTP on the tiny models.

Each engine and mode it supports; its image against diffusers' own pipeline called on the
same weights, seed and settings; same seed, same bytes; LoRAs changing FLUX's output; the
fields OctoAI refuses refused by the server too; OctoAI's own SDK generating unchanged.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from octoai.client import OctoAI
from PIL import Image

from dagster_octoai.api.models import ImageGenerationRequest
from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.server.backends.diffusers.flow import flow_call_kwargs
from dagster_octoai.testing.server import sample_image_b64

from ..conftest import STEPS, Generate, images_of, pil

pytestmark = pytest.mark.timeout(900)

SIZE = (1024, 1024)
#: FLUX's smallest size: a quarter of the pixels (and of the latent tokens) of the default,
#: and the same code paths; SD3 has no size below 1024x1024.
FLUX_SIZE = (512, 512)


def one(post: Generate, engine: str, **body: Any) -> np.ndarray:
    body.setdefault("image_encoding", "png")
    (data,) = images_of(post(engine, **body))
    return np.asarray(pil(data).convert("RGB"), dtype=np.int16)


def mask_b64(size: tuple[int, int]) -> str:
    width, height = size
    mask = Image.new("L", size, 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def assert_close(served: np.ndarray, direct: np.ndarray) -> None:
    """Byte-identical, or within one level on under 0.1% of the values."""
    diff = np.abs(served - direct)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), (diff > 0).mean())


FLOW_MODES = [
    ("flux-schnell", "txt2img"),
    ("flux-schnell", "img2img"),
    ("flux-schnell", "inpaint"),
    ("flux-dev", "txt2img"),
    ("flux-dev", "img2img"),
    ("flux-dev", "inpaint"),
    ("sd3", "txt2img"),
    ("sd3", "img2img"),
]
PIPELINES = {
    ("flux", "txt2img"): "FluxPipeline",
    ("flux", "img2img"): "FluxImg2ImgPipeline",
    ("flux", "inpaint"): "FluxInpaintPipeline",
    ("sd3", "txt2img"): "StableDiffusion3Pipeline",
    ("sd3", "img2img"): "StableDiffusion3Img2ImgPipeline",
}


def _size(engine: str) -> tuple[int, int]:
    return SIZE if engine == "sd3" else FLUX_SIZE


def _body(engine: str, mode: str) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a red fox in the snow", "seed": 11, "steps": STEPS}
    if engine == "sd3":
        body["negative_prompt"] = "blurry"
    else:
        body["width"], body["height"] = FLUX_SIZE
    if engine == "flux-dev":
        body["cfg_scale"] = 5.0
    if mode != "txt2img":
        body["init_image"] = sample_image_b64(_size(engine), "photo")
        body["strength"] = 0.7
    if mode == "inpaint":
        body["mask_image"] = mask_b64(_size(engine))
    return body


@pytest.mark.parametrize(("engine", "mode"), FLOW_MODES, ids=[f"{e}-{m}" for e, m in FLOW_MODES])
def test_engine_mode_equals_diffusers_pipeline(
    post: Generate, tiny_models: Path, engine: str, mode: str
) -> None:
    """The server's image is diffusers' own pipeline's on the same weights, seed and settings."""
    import diffusers

    body = _body(engine, mode)
    served = one(post, engine, **body)
    width, height = _size(engine)
    assert served.shape == (height, width, 3)

    folder = "sd3/base" if engine == "sd3" else f"flux/{engine.removeprefix('flux-')}"
    family = "sd3" if engine == "sd3" else "flux"
    cls = getattr(diffusers, PIPELINES[family, mode])
    pipe = cls.from_pretrained(str(tiny_models / folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    request = ImageGenerationRequest.build(body, engine=engine)
    kwargs = flow_call_kwargs([(request, 1)], mode)
    # The wiring the server is expected to do, said here independently of flow.py.
    assert kwargs["prompt"] == [body["prompt"]]
    assert kwargs["num_inference_steps"] == STEPS
    assert kwargs["guidance_scale"] == {"flux-schnell": 0.0, "flux-dev": 5.0, "sd3": 12.0}[engine]
    with torch.inference_mode():
        image = pipe(**kwargs, generator=[torch.Generator().manual_seed(11)]).images[0]
    assert_close(served, np.asarray(image.convert("RGB"), dtype=np.int16))
    if mode == "txt2img":
        # Same seed, same bytes; another seed, another picture.
        assert np.array_equal(served, one(post, engine, **body))
        assert not np.array_equal(served, one(post, engine, **{**body, "seed": 12}))


def test_schnell_defaults_to_four_steps_and_ignores_cfg(post: Generate) -> None:
    default = one(post, "flux-schnell", prompt="a fox", seed=3, steps=None)  # null: unset
    assert default.shape == (1024, 1024, 3)
    four = one(post, "flux-schnell", prompt="a fox", seed=3, steps=4)
    assert np.array_equal(default, four)
    assert np.array_equal(
        four, one(post, "flux-schnell", prompt="a fox", seed=3, steps=4, cfg_scale=9)
    )


def test_loras_change_flux_output(post: Generate) -> None:
    fox = {"prompt": "a fox", "seed": 4, "width": FLUX_SIZE[0], "height": FLUX_SIZE[1]}
    base = one(post, "flux-dev", **fox)
    crayon = one(post, "flux-dev", **fox, loras={"tiny-flux-crayon": 1.0})
    ink = one(post, "flux-dev", **fox, loras={"octoai:tiny-flux-ink": 1.0})
    assert not np.array_equal(base, crayon) and not np.array_equal(crayon, ink)
    # The adapters are off again without loras; schnell takes the shared LoRAs too.
    assert np.array_equal(base, one(post, "flux-dev", **fox))
    plain = one(post, "flux-schnell", **fox)
    assert not np.array_equal(plain, one(post, "flux-schnell", **fox, loras={"tiny-flux-ink": 1.0}))


def test_sd3_negative_prompt_changes_output(post: Generate) -> None:
    a = one(post, "sd3", prompt="a fox", seed=5)
    assert not np.array_equal(a, one(post, "sd3", prompt="a fox", seed=5, negative_prompt="dark"))


def test_ssd_is_sdxl_pipelines_on_its_own_base(post: Generate, tiny_models: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    served = one(post, "ssd", prompt="a red fox", seed=6)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(tiny_models / "ssd" / "base"), local_files_only=True
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # OctoAI's default sampler
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        direct = pipe(
            "a red fox",
            num_inference_steps=STEPS,
            guidance_scale=12.0,
            width=1024,
            height=1024,
            generator=[torch.Generator().manual_seed(6)],
        ).images[0]
    assert_close(served, np.asarray(direct.convert("RGB"), dtype=np.int16))
    # Its own LoRA, style presets and img2img: the SDXL features.
    assert not np.array_equal(
        served, one(post, "ssd", prompt="a red fox", seed=6, loras={"tiny-ssd": 1.0})
    )
    styled = one(post, "ssd", prompt="a red fox", seed=6, style_preset="anime")
    assert not np.array_equal(served, styled)
    init = sample_image_b64(SIZE, "photo")
    assert one(post, "ssd", prompt="a red fox", seed=6, init_image=init).shape == (1024, 1024, 3)


def test_server_refuses_unsupported_fields_and_unserved_engines(
    post: Generate, engines_server: LocalOctoAIServer
) -> None:
    answer = post("flux-dev", prompt="x", negative_prompt="y")
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "negative_prompt"]
    assert "flux-dev" in answer.json()["detail"][0]["msg"]
    answer = post("sd3", prompt="x", loras={"tiny-flux-ink": 1.0})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "loras"]
    answer = post("flux-schnell", prompt="x", loras={"tiny-crayon": 1.0})  # an SDXL LoRA
    assert answer.status_code == 422 and "tiny-flux-crayon" in answer.text
    options = httpx.get(f"{engines_server.url}/playground/options.json").json()
    assert [(e["name"], e["refused"], e["default_steps"]) for e in options["engines"]] == [
        ("sdxl", [], 30),
        ("sd", [], 30),
        ("ssd", [], 30),
        ("sd3", ["sampler", "style_preset"], 30),
        ("flux-schnell", ["negative_prompt", "sampler", "style_preset"], 4),
        ("flux-dev", ["negative_prompt", "sampler", "style_preset"], 30),
    ]
    described = engines_server._client.get("/_local/backend").json()
    assert described["engines"] == [
        "sdxl", "sd", "controlnet-sdxl", "controlnet-sd15", "ssd", "sd3", "flux-schnell", "flux-dev"
    ]  # fmt: skip


def test_official_sdk_generates_sd3_and_flux(sdk: OctoAI) -> None:
    sd3 = sdk.image_gen.generate_sd3(
        prompt="a lighthouse", negative_prompt="fog", steps=STEPS, seed=21, image_encoding="png"
    )
    schnell = sdk.image_gen.generate_flux_schnell(
        prompt="a lighthouse", seed=[21, 22], num_images=2, image_encoding="png"
    )
    dev = sdk.image_gen.generate_flux_dev(
        prompt="a lighthouse",
        steps=STEPS,
        seed=21,
        cfg_scale=4.0,
        loras={"octoai:tiny-flux-crayon": 0.5},
        width=512,
        height=512,
    )
    assert [im.seed for im in schnell.images] == [21, 22]
    for response, size in ((sd3, (1024, 1024)), (schnell, (1024, 1024)), (dev, (512, 512))):
        for im in response.images:
            assert im.image_b64 is not None and not im.removed_for_safety
            with Image.open(io.BytesIO(base64.b64decode(im.image_b64))) as decoded:
                assert decoded.size == size
