"""Inputs refused before anything is sent, and image inputs that mean one picture.

Non-finite numbers never reach the wire; a path that is not an image is named without
a byte of the file; a PIL image goes out losslessly, so a mask passed as a PIL image,
as bytes or as a file is one request with one fingerprint.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
from _scripted_server import ScriptedServer, module_scripted_server, ok, server
from PIL import Image, PngImagePlugin

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.api.errors import RequestValidationError
from dagster_octoai.api.models import ImageGenerationRequest
from dagster_octoai.server import LocalOctoAIServer, ServerConfig

__all__ = ["module_scripted_server", "server"]  # fixtures used by this module

_CONTROLNET = {
    "engine": "controlnet-sdxl",
    "controlnet": "octoai:canny_sdxl",
    "controlnet_image": Image.new("L", (8, 8), 255),
}
#: Every float field, with what else its engine needs.
FLOAT_FIELDS: dict[str, dict[str, Any]] = {
    "cfg_scale": {},
    "high_noise_frac": {},
    "strength": {"init_image": Image.new("RGB", (8, 8))},
    "controlnet_conditioning_scale": _CONTROLNET,
    "controlnet_early_stop": _CONTROLNET,
}


def _mask() -> Image.Image:
    """A hard-edged inpainting mask: what a lossy encoding would blur."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (13, 11, 47, 50))  # edges off the 8x8 grid JPEG encodes by
    return mask


# ---- non-finite numbers ----------------------------------------------------------------


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("field", list(FLOAT_FIELDS))
def test_a_non_finite_number_is_refused_naming_its_field(field: str, value: float) -> None:
    with pytest.raises(RequestValidationError) as info:
        ImageGenerationRequest.build({"prompt": "a fox", **FLOAT_FIELDS[field], field: value})
    assert [e["field"] for e in info.value.errors] == [field]
    assert "must be a finite number" in str(info.value) and field in str(info.value)


def test_a_non_finite_lora_weight_is_refused_naming_the_lora() -> None:
    with pytest.raises(RequestValidationError, match=r"loras\.detail: must be a finite number"):
        ImageGenerationRequest.build({"prompt": "a fox", "loras": {"detail": math.nan}})


def test_the_client_sends_nothing_for_a_non_finite_number(server: ScriptedServer) -> None:
    server.script(ok())
    with OctoAIClient("sk-test-0123456789", base_url=server.url) as client:
        with pytest.raises(RequestValidationError, match="controlnet_conditioning_scale"):
            client.generate(
                {"prompt": "a fox", **_CONTROLNET, "controlnet_conditioning_scale": math.inf}
            )
        with pytest.raises(RequestValidationError, match="cfg_scale"):
            client.submit({"prompt": "a fox", "cfg_scale": math.nan})
    assert server.requests == []


def test_the_server_refuses_infinity_on_the_wire() -> None:
    with LocalOctoAIServer(ServerConfig(token="sk-test-0123456789")) as srv:
        # json.dumps writes inf as the bare word Infinity: what an older client sent.
        control = base64.b64encode(_png(Image.new("L", (8, 8), 255))).decode()
        body = json.dumps(
            {
                "prompt": "a fox",
                "controlnet": "octoai:canny_sdxl",
                "controlnet_image": control,
                "controlnet_conditioning_scale": math.inf,
            }
        )
        assert "Infinity" in body
        answer = httpx.post(
            f"{srv.url}/generate/controlnet-sdxl",
            content=body,
            headers={
                "Authorization": "Bearer sk-test-0123456789",
                "Content-Type": "application/json",
            },
        )
        assert answer.status_code == 422
        assert srv.stats()["paid_generations"] == 0


# ---- paths that are not images -------------------------------------------------------------


def test_a_path_that_is_not_an_image_is_named_without_any_of_its_bytes(tmp_path: Path) -> None:
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG\n")
    for form in (str(secret), secret):
        with pytest.raises(RequestValidationError) as info:
            ImageGenerationRequest.build({"prompt": "a fox", "init_image": form})
        text = str(info.value)
        assert f"init_image: the file {str(secret)!r} is not an image" in text
        for fragment in ("aws_", "wJalr", "secret_access", "b'"):
            assert fragment not in text.replace(str(secret), "<path>")


def test_bytes_that_are_not_an_image_are_not_echoed() -> None:
    with pytest.raises(RequestValidationError) as info:
        ImageGenerationRequest.build({"prompt": "a fox", "init_image": b"PRIVATE KEY material"})
    assert "not an image" in str(info.value) and "PRIVATE" not in str(info.value)


# ---- one picture, one request ---------------------------------------------------------------


def _png(image: Image.Image, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **options)
    return buf.getvalue()


def _inpaint(mask: Any, init: Any) -> ImageGenerationRequest:
    return ImageGenerationRequest.build(
        {"prompt": "a fox", "engine": "sd", "seed": 3, "init_image": init, "mask_image": mask}
    )


def test_a_pil_mask_is_sent_pixel_for_pixel() -> None:
    mask = _mask()
    sent = base64.b64decode(_inpaint(mask, Image.new("RGB", (64, 64))).to_wire()["mask_image"])
    with Image.open(io.BytesIO(sent)) as decoded:
        assert decoded.mode == "L" and decoded.tobytes() == mask.tobytes()


def test_the_same_picture_as_pil_bytes_or_a_path_has_one_fingerprint(tmp_path: Path) -> None:
    mask, init = _mask(), Image.new("RGB", (64, 64), (90, 120, 200))
    mask_path, init_path = tmp_path / "mask.png", tmp_path / "init.jpg"
    # The files differ in bytes from what the client would encode: another compression
    # level and a text chunk for the mask, a JPEG for the start image.
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "some editor")
    mask_path.write_bytes(_png(mask, compress_level=1, pnginfo=info))
    init.save(init_path, format="JPEG", quality=90)
    with Image.open(init_path) as opened:
        init_decoded = opened.copy()

    forms = [
        _inpaint(mask, init_decoded),  # PIL images
        _inpaint(mask_path.read_bytes(), init_path.read_bytes()),  # bytes
        _inpaint(mask_path, init_path),  # paths
        _inpaint(str(mask_path), str(init_path)),  # paths as str
    ]
    assert len({req.fingerprint() for req in forms}) == 1
    # Another picture is another request.
    other = _mask()
    other.putpixel((0, 0), 255)
    assert _inpaint(other, init_decoded).fingerprint() != forms[0].fingerprint()
