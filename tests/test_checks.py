"""Image checks: each passing and failing, built into the factory and standalone."""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import base64
import io
from typing import Any

import pytest
from dagster import AssetExecutionContext, EnvVar, asset, materialize
from PIL import Image

from dagster_octoai.api.batch import ImageBatch
from dagster_octoai.api.models import ImageGenerationRequest, ImageGenerationResponse
from dagster_octoai.checks import (
    CHECK_DECODES,
    CHECK_NO_REMOVED,
    CHECK_SIZE,
    evaluate_image_checks,
    octoai_image_checks,
)
from dagster_octoai.io_managers import LocalImageIOManager
from dagster_octoai.resources import OctoAIResource


@pytest.fixture
def octoai(octoai_server: Any, monkeypatch: pytest.MonkeyPatch) -> OctoAIResource:
    monkeypatch.setenv("OCTOAI_TOKEN", octoai_server.token)
    return OctoAIResource(token=EnvVar("OCTOAI_TOKEN"), base_url=octoai_server.url)


def _generate(octoai: OctoAIResource, prompt: str) -> ImageGenerationResponse:
    with octoai.client as client:
        return client.generate(ImageGenerationRequest(prompt=prompt, engine="sd", steps=2, seed=3))


def _passed(results: list[Any]) -> dict[str, bool]:
    return {r.check_name: r.passed for r in results}


def test_all_checks_pass_on_a_served_image(octoai: OctoAIResource) -> None:
    results = evaluate_image_checks("x", ImageBatch([_generate(octoai, "a cat")]))
    assert _passed(results) == {CHECK_NO_REMOVED: True, CHECK_SIZE: True, CHECK_DECODES: True}


def test_safety_check_fails_when_the_server_removes_an_image(octoai: OctoAIResource) -> None:
    result = _generate(octoai, "a nsfw cat")  # the server's safety trigger word
    assert result.removed_count == 1
    checks = evaluate_image_checks("x", [result])
    assert _passed(checks)[CHECK_NO_REMOVED] is False
    assert checks[0].metadata["removed_seeds"].value == [3]


def test_size_check_fails_when_the_image_is_not_the_requested_size(octoai: OctoAIResource) -> None:
    served = _generate(octoai, "a cat")  # 512x512
    asked_wider = ImageGenerationRequest(prompt="a cat", engine="sd", width=768, height=512)
    checks = evaluate_image_checks(
        "x", ImageGenerationResponse(images=served.images, request=asked_wider)
    )
    assert _passed(checks)[CHECK_SIZE] is False
    assert "512x512, requested 768x512" in checks[1].metadata["wrong_size"].value[0]


def test_decode_check_fails_on_a_truncated_image(octoai: OctoAIResource) -> None:
    served = _generate(octoai, "a cat")
    data = served.images[0].data
    body = served.model_dump()
    body["images"][0]["image_b64"] = base64.b64encode(data[: len(data) // 2]).decode()
    truncated = ImageGenerationResponse(request=served.request, **body)
    checks = evaluate_image_checks("x", [truncated])
    assert _passed(checks)[CHECK_DECODES] is False
    assert _passed(checks)[CHECK_SIZE] is True  # not judged: it does not decode


def _with_image(served: ImageGenerationResponse, data: bytes) -> ImageGenerationResponse:
    body = served.model_dump()
    body["images"][0]["image_b64"] = base64.b64encode(data).decode()
    return ImageGenerationResponse(request=served.request, **body)


def test_decode_check_fails_on_a_corrupt_header_that_keeps_its_end_marker(
    octoai: OctoAIResource,
) -> None:
    # The end marker alone does not pass an image: its header must parse too.
    served = _generate(octoai, "a cat")
    data = served.images[0].data
    corrupt = data[:3] + b"\x00" * 64 + data[-2:]
    checks = evaluate_image_checks("x", [_with_image(served, corrupt)])
    assert _passed(checks)[CHECK_DECODES] is False
    assert "does not decode" in checks[2].metadata["not_decoding"].value[0]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_decode_check_fails_on_each_truncated_format(octoai: OctoAIResource, fmt: str) -> None:
    served = _generate(octoai, "a cat")
    buf = io.BytesIO()
    Image.new("RGB", (512, 512), (200, 30, 30)).save(buf, format=fmt)
    whole = buf.getvalue()
    assert _passed(evaluate_image_checks("x", [_with_image(served, whole)]))[CHECK_DECODES]
    checks = evaluate_image_checks("x", [_with_image(served, whole[:-4])])
    assert _passed(checks)[CHECK_DECODES] is False
    # PIL already refuses a short WebP at open; the others fail on their end marker.
    expected = "does not decode" if fmt == "WEBP" else "is truncated"
    assert expected in checks[2].metadata["not_decoding"].value[0]


def test_standalone_checks_on_users_asset_stored_by_the_image_io_manager(
    octoai: OctoAIResource, tmp_path: Any
) -> None:
    @asset(io_manager_key="images")
    def cats(context: AssetExecutionContext, octoai: OctoAIResource) -> ImageGenerationResponse:
        with octoai.get_client(context) as client:
            return client.generate({"prompt": "cats", "engine": "sd", "steps": 2, "num_images": 2})

    checks = octoai_image_checks(cats)
    result = materialize(
        [cats, checks],
        resources={"octoai": octoai, "images": LocalImageIOManager(base_dir=str(tmp_path))},
    )
    assert result.success
    evals = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert {n: e.passed for n, e in evals.items()} == {
        CHECK_NO_REMOVED: True,
        CHECK_SIZE: True,
        CHECK_DECODES: True,
    }
    assert evals[CHECK_DECODES].metadata["checked"].value == 2


def test_standalone_decode_check_fails_on_corrupted_stored_image(
    octoai: OctoAIResource, tmp_path: Any
) -> None:
    @asset
    def broken(context: AssetExecutionContext, octoai: OctoAIResource) -> ImageBatch:
        with octoai.get_client(context) as client:
            req = ImageGenerationRequest(prompt="dogs", engine="sd", steps=2)
            resp = client.generate(req)
        body = resp.model_dump()
        buf = io.BytesIO()
        Image.new("RGB", (512, 512)).save(buf, format="PNG")
        body["images"][0]["image_b64"] = base64.b64encode(buf.getvalue()[:200]).decode()
        return ImageBatch([ImageGenerationResponse(request=req, **body)])

    result = materialize([broken, octoai_image_checks(broken)], resources={"octoai": octoai})
    assert result.success
    evals = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evals == {CHECK_NO_REMOVED: True, CHECK_SIZE: True, CHECK_DECODES: False}
