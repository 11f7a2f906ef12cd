"""``POST /generate/svd`` on the diffusers backend: the tiny SVD of ``tiny-models`` over HTTP.

One clip through this package's client and the same request through OctoAI's SDK
(``octoai`` 1.11.0): both decode to the model's frames at the asked fps and size, and the
same seed gives the same bytes. A model directory without ``svd/base`` answers 404.
"""

from __future__ import annotations

import base64
import doctest
import io
import os
from pathlib import Path
from typing import Any

import av
import pytest
from octoai.client import OctoAI
from octoai.environment import OctoAIEnvironment

from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.api.errors import APIStatusError
from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.server.backends.diffusers import svd
from dagster_octoai.server.backends.diffusers.tiny_svd import TINY_SVD_FRAMES
from dagster_octoai.testing.plugin import TEST_TOKEN
from dagster_octoai.testing.server import sample_image_b64

from .conftest import STEPS

pytestmark = pytest.mark.timeout(900)

IMAGE = sample_image_b64((96, 54))


def probe(data: bytes) -> tuple[int, float, tuple[int, int], str]:
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = len(list(container.decode(video=0)))
        return (
            frames,
            float(stream.average_rate or 0),
            (stream.width, stream.height),
            stream.codec_context.name,
        )


def test_svd_clip_client_and_sdk_same_seed_same_bytes(diffusers_server: LocalOctoAIServer) -> None:
    request: dict[str, Any] = {
        "image": IMAGE,
        "steps": STEPS,
        "fps": 5,
        "seed": 2024,
        "motion_scale": 0.3,
        "noise_aug_strength": 0.1,
        "cfg_scale": 2.5,
        "constant_rate_factor": 30,
    }
    with OctoAIClient(TEST_TOKEN, base_url=diffusers_server.url, timeout=600) as client:
        answer = client.generate_video(request)
    clip = answer.videos[0].data
    assert answer.seeds == [2024]
    assert probe(clip) == (TINY_SVD_FRAMES, 5.0, (1024, 576), "h264")

    env = OctoAIEnvironment(
        default=diffusers_server.url, image_gen=diffusers_server.url, text_gen=diffusers_server.url
    )
    sdk = OctoAI(api_key=TEST_TOKEN, environment=env, timeout=600)
    response = sdk.image_gen.generate_svd(**request)
    video = response.videos[0].video
    assert video is not None and response.videos[0].seed == 2024
    assert base64.b64decode(video) == clip


def test_motion_scale_maps_to_svd_motion_buckets() -> None:
    result = doctest.testmod(svd, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
    assert [svd.motion_bucket(m) for m in (0.0, 0.5, 1.0)] == [0, 127, 255]


def test_no_svd_weights_is_unknown_engine(tiny_models: Path, tmp_path: Path) -> None:
    """A model directory with the image families only: /generate/svd is 404, images still work."""
    for family in ("sd15", "sdxl"):
        os.symlink(tiny_models / family, tmp_path / family)
    config = ServerConfig(
        token=TEST_TOKEN, backend="diffusers", models=str(tmp_path), device=("cpu",)
    )
    with (
        LocalOctoAIServer(config) as server,
        OctoAIClient(TEST_TOKEN, base_url=server.url) as client,
    ):
        with pytest.raises(APIStatusError) as caught:
            client.generate_video({"image": IMAGE, "steps": 1})
        assert caught.value.status_code == 404
        assert "Unknown engine 'svd'" in str(caught.value)
