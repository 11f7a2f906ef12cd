"""``POST /generate/svd`` over real HTTP on the placeholder backend: the client, the server's
validation, sync and async, and OctoAI's own SDK (``octoai`` 1.11.0) unchanged."""

from __future__ import annotations

import asyncio
import base64
import doctest
import io
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import av
import httpx
import pytest
from octoai.client import OctoAI
from octoai.environment import OctoAIEnvironment
from PIL import Image

from dagster_octoai.api import video as video_models
from dagster_octoai.api.client import AsyncOctoAIClient, OctoAIClient
from dagster_octoai.api.errors import APIStatusError, RequestValidationError
from dagster_octoai.api.video import SVD_FRAMES, VideoGenerationRequest
from dagster_octoai.server import LocalOctoAIServer, mp4, seeds
from dagster_octoai.testing.server import sample_image_b64

pytestmark = pytest.mark.timeout(120)

# A small landscape input: the placeholder answers at the size nearest its aspect ratio.
IMAGE = sample_image_b64((160, 90))


def probe(data: bytes) -> tuple[int, float, tuple[int, int], str]:
    """(decoded frame count, frames per second, (width, height), codec) of an MP4."""
    with av.open(io.BytesIO(data), mode="r") as container:
        assert container.format.name.startswith("mov,mp4")
        stream = container.streams.video[0]
        frames = len(list(container.decode(video=0)))
        rate = float(stream.average_rate or 0)
        return frames, rate, (stream.width, stream.height), stream.codec_context.name


@pytest.fixture
def client(octoai_server: LocalOctoAIServer) -> Iterator[OctoAIClient]:
    with OctoAIClient(octoai_server.token, base_url=octoai_server.url) as c:
        yield c


def test_generate_video_frames_fps_size_and_seeds(client: OctoAIClient) -> None:
    answer = client.generate_video(
        {"image": IMAGE, "fps": 6, "seed": 11, "num_videos": 2, "width": 768, "height": 768}
    )
    assert answer.seeds == [11, 12]
    assert answer.request is not None and answer.request.fps == 6
    first, second = (v.data for v in answer.videos)
    assert probe(first) == (SVD_FRAMES, 6.0, (768, 768), "h264")
    assert first != second  # another seed, another clip
    again = client.generate_video(
        {"image": IMAGE, "fps": 6, "seed": 11, "width": 768, "height": 768}
    )
    assert again.videos[0].data == first  # same seed, same bytes


def test_size_inferred_from_the_image(client: OctoAIClient) -> None:
    portrait = sample_image_b64((90, 160))
    answer = client.generate_video({"image": portrait, "seed": 1, "constant_rate_factor": 40})
    frames, fps, size, _ = probe(answer.videos[0].data)
    assert (frames, fps, size) == (SVD_FRAMES, 7.0, (576, 1024))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cfg_scale", 0),
        ("cfg_scale", 10.5),
        ("constant_rate_factor", 52),
        ("fps", 0),
        ("fps", 26),
        ("motion_scale", 1.5),
        ("noise_aug_strength", -0.1),
        ("num_videos", 17),
        ("seed", 2**32),
        ("steps", 51),
        ("width", 512),
        ("prompt", "a fox"),
    ],
)
def test_every_field_validated_by_client_and_server(
    client: OctoAIClient, octoai_server: LocalOctoAIServer, field: str, value: Any
) -> None:
    body: dict[str, Any] = {"image": IMAGE, field: value}
    if field == "width":
        body["height"] = 512
    before = octoai_server.stats()["paid_generations"]
    with pytest.raises(RequestValidationError) as caught:
        client.generate_video(body)
    assert field in {e["field"] for e in caught.value.errors}
    assert octoai_server.stats()["paid_generations"] == before  # nothing was sent
    raw = httpx.post(
        f"{octoai_server.url}/generate/svd",
        json=body,
        headers={"Authorization": f"Bearer {octoai_server.token}"},
        timeout=30,
    )
    assert raw.status_code == 422, raw.text
    assert ["body", field] in [d["loc"] for d in raw.json()["detail"]]


def test_server_refuses_bad_image_and_missing_image(octoai_server: LocalOctoAIServer) -> None:
    auth = {"Authorization": f"Bearer {octoai_server.token}"}
    for body in (
        {},
        {"image": "not base64!"},
        {"image": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"x" * 40).decode()},
    ):
        raw = httpx.post(f"{octoai_server.url}/generate/svd", json=body, headers=auth, timeout=30)
        assert raw.status_code == 422, raw.text
        assert raw.json()["detail"][0]["loc"] == ["body", "image"]
    assert (
        httpx.post(
            f"{octoai_server.url}/generate/svd", json={"image": IMAGE}, timeout=30
        ).status_code
        == 401
    )


def test_sync_and_async_clients_submit_and_wait(client: OctoAIClient) -> None:
    request = VideoGenerationRequest(image=IMAGE, seed=5, fps=5, width=1024, height=576)
    expected = client.generate_video(request).videos[0].data
    job = client.submit_video(request)
    answer = client.wait_video(job, timeout=60, poll_interval_s=0.05)
    assert answer.response_id == job.response_id and answer.request == request
    assert answer.videos[0].data == expected

    async def run() -> bytes:
        async with AsyncOctoAIClient(
            client._token.get_secret_value(), base_url=client.base_url
        ) as ac:
            job = await ac.submit_video(request)
            done = await ac.wait_video(job, timeout=60, poll_interval_s=0.05)
            direct = await ac.generate_video(request)
            assert direct.videos[0].data == expected
            return done.videos[0].data

    assert asyncio.run(run()) == expected


def test_submit_video_idempotency_key_and_fetch_video(
    client: OctoAIClient, octoai_server: LocalOctoAIServer
) -> None:
    request = VideoGenerationRequest(image=IMAGE, seed=8, fps=5)
    before = octoai_server.stats()["async_jobs"]["submitted"]
    first = client.submit_video(request, idempotency_key="clip-8-attempt-1")
    # The same key and body again (an answer lost on the wire, retried): the first job.
    again = client.submit_video(request, idempotency_key="clip-8-attempt-1")
    assert again.response_id == first.response_id
    assert octoai_server.stats()["async_jobs"]["submitted"] - before == 1
    with pytest.raises(APIStatusError, match="409 Conflict: Idempotency-Key"):  # another body
        client.submit_video(
            request.model_copy(update={"seed": 9}), idempotency_key="clip-8-attempt-1"
        )
    client.wait_video(first, timeout=60, poll_interval_s=0.05)
    fetched = client.fetch_video(first)
    assert fetched.response_id == first.response_id and fetched.seeds == [8]
    assert probe(fetched.videos[0].data)[:2] == (SVD_FRAMES, 5.0)
    with pytest.raises(TypeError, match="expected the VideoJob of submit_video"):
        client.fetch_video(first.response_id)  # type: ignore[arg-type]


def test_official_sdk_generate_svd(octoai_server: LocalOctoAIServer) -> None:
    env = OctoAIEnvironment(
        default=octoai_server.url, image_gen=octoai_server.url, text_gen=octoai_server.url
    )
    sdk = OctoAI(api_key=octoai_server.token, environment=env, timeout=60)
    response = sdk.image_gen.generate_svd(
        image=IMAGE,
        steps=25,
        cfg_scale=3,
        fps=7,
        motion_scale=0.5,
        noise_aug_strength=0.02,
        num_videos=1,
        seed=33445,
    )
    assert [v.seed for v in response.videos] == [33445]
    assert response.videos[0].video is not None
    assert probe(base64.b64decode(response.videos[0].video))[:3] == (SVD_FRAMES, 7.0, (1024, 576))
    assert response.prediction_time_ms >= 0
    assert Image.open(io.BytesIO(base64.b64decode(IMAGE))).size == (160, 90)


def test_async_body_over_10_mb_refused_before_sending(client: OctoAIClient) -> None:
    big = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(11 * 1024 * 1024)).decode()
    request = VideoGenerationRequest.model_construct(image=big)
    with pytest.raises(RequestValidationError, match=r"image: the JSON body is .* over the 10 MB"):
        client.submit_video(request)


@pytest.mark.parametrize("module", [video_models, seeds, mp4])
def test_docstring_examples_run(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
