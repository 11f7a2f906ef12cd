"""Photo merge (``transfer_images``) on IP-Adapter, over real HTTP on the tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.server import sample_image_b64

from ..conftest import tiny_models_of
from .test_flow_engines import one

pytestmark = pytest.mark.timeout(900)

FOX = sample_image_b64((256, 256), "photo")
SKY = sample_image_b64((192, 256), "edges")


def test_photo_merge_one_word_two_words_and_nothing_lingers(post: Any) -> None:
    body: dict[str, Any] = {"prompt": "a sks fox under a zwx sky", "seed": 8, "use_refiner": False}
    plain = one(post, "sdxl", **body)
    fox = one(post, "sdxl", **body, transfer_images={"sks": [FOX]})
    assert not np.array_equal(plain, fox)
    # The reference images are what changes it: other images, another picture.
    assert not np.array_equal(fox, one(post, "sdxl", **body, transfer_images={"sks": [SKY]}))
    both = one(post, "sdxl", **body, transfer_images={"sks": [FOX], "zwx": [SKY, FOX]})
    assert not np.array_equal(fox, both)
    # Deterministic, and the adapters are unloaded after each request.
    assert np.array_equal(fox, one(post, "sdxl", **body, transfer_images={"sks": [FOX]}))
    assert np.array_equal(plain, one(post, "sdxl", **body))


def test_photo_merge_composes_with_a_controlnet_and_a_lora(post: Any) -> None:
    body: dict[str, Any] = {
        "prompt": "a sks fox",
        "seed": 9,
        "controlnet": "canny_sdxl",
        "controlnet_image": sample_image_b64((1024, 1024), "edges"),
        "loras": {"tiny-crayon": 0.8},
        "style_preset": "photographic",
    }
    plain = one(post, "controlnet-sdxl", **body)
    merged = one(post, "controlnet-sdxl", **body, transfer_images={"sks": [FOX]})
    assert not np.array_equal(plain, merged)
    # The LoRA still counts under photo merge.
    no_lora = {k: v for k, v in body.items() if k != "loras"}
    assert not np.array_equal(
        merged, one(post, "controlnet-sdxl", **no_lora, transfer_images={"sks": [FOX]})
    )


def test_photo_merge_refused_where_there_are_no_weights_or_no_sdxl(
    post: Any, engines_server: LocalOctoAIServer
) -> None:
    # The tiny SSD has no IP-Adapter: the server keeps its 422.
    answer = post("ssd", prompt="a sks fox", transfer_images={"sks": [FOX]})
    assert answer.status_code == 422, answer.text
    (detail,) = answer.json()["detail"]
    assert detail["loc"] == ["body", "transfer_images"]
    assert "not supported by this server" in detail["msg"]
    answer = post("sd", prompt="a sks fox", transfer_images={"sks": [FOX]})
    assert answer.status_code == 422
    assert "SDXL engines only" in answer.json()["detail"][0]["msg"]
    assert engines_server._client is not None
    described = engines_server._client.get("/_local/backend").json()
    assert described["library"]["sdxl"]["photo_merge"] == "tiny-photo-merge"
    assert described["library"]["ssd"]["photo_merge"] is None


def test_gpu_benchmark_new_cases_quick_on_cpu(tiny_models: Path, tmp_path: Path) -> None:
    """The benchmark's FLUX, photo merge and SVD rows run (figures on a CPU mean nothing)."""
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    models = tiny_models_of(tiny_models, tmp_path / "models", "flux", "sdxl", "svd")
    common = ["--quick", "--device", "cpu", "--models", str(models), "--output", str(out)]
    assert gpu.main([*common, "--only", "flux-schnell,sdxl-photo-merge,svd"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["engine"], r["photo_merge"]) for r in rows] == [
        ("flux-schnell", False),
        ("sdxl", True),
        ("svd", False),
    ]
    # The SVD row: a 1024x576 clip from the server's renderer, given the models built for it.
    assert (rows[2]["width"], rows[2]["height"], rows[2]["batch"]) == (1024, 576, 1)
    assert 0 < rows[2]["parameters"] < 10**8
    assert all(r["direct_p50_s"] > 0 and r["api_p50_s"] > 0 for r in rows)
    # A spent budget starts no case, and still writes the (empty) figures.
    assert gpu.main([*common, "--budget-s", "0"]) == 0
    assert json.loads(out.read_text())["results"] == []
    with pytest.raises(SystemExit):
        gpu.main([*common, "--only", "flux-pro"])
