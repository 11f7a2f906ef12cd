"""A second server: optional batching, on a model directory without the SDXL refiner.

Batching: waiting requests with the same settings share one pipeline call. Without
refiner weights the server says so and ignores ``use_refiner`` rather than refusing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.testing.plugin import TEST_TOKEN
from dagster_octoai.testing.server import sample_image_b64

from .conftest import Generate, images_of, pil

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def batching_server(
    tiny_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalOctoAIServer]:
    # The tiny models without sdxl/refiner nor the photo merge IP-Adapter (links to the
    # rest), and only the SDXL and SD 1.5 families.
    models = tmp_path_factory.mktemp("no-refiner")
    for family in ("sd15", "sdxl"):
        (models / family).mkdir()
        for entry in (tiny_models / family).iterdir():
            if entry.name not in ("refiner", "ip_adapters"):
                (models / family / entry.name).symlink_to(entry)
    config = ServerConfig(
        token=TEST_TOKEN,
        backend="diffusers",
        models=str(models),
        device=("cpu",),
        batch_max_images=4,
    )
    with LocalOctoAIServer(config) as server:  # 900 s: the diffusers default
        yield server


def _control(server: LocalOctoAIServer) -> httpx.Client:
    """The runner's own client: the admin token, for the ``/_local/*`` control routes."""
    assert server._client is not None
    return server._client


def _user(server: LocalOctoAIServer) -> httpx.Client:
    """A client with the user token (the admin token is refused on the API routes)."""
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=600
    )


def _array(data: bytes) -> np.ndarray:
    return np.asarray(pil(data).convert("RGB"), dtype=np.int16)


def test_waiting_requests_with_the_same_settings_share_a_call(
    batching_server: LocalOctoAIServer, post: Generate
) -> None:
    local = _control(batching_server)
    described = local.get("/_local/backend").json()
    assert described["batch_max_images"] == 4 and described["pipeline_calls"] == 0
    # A request alone is not batched: the same bytes as on the server without batching.
    body = {"prompt": "a kettle", "seed": 3, "steps": 2, "image_encoding": "png"}
    client = _user(batching_server)
    alone = client.post("/generate/sd", json=body)
    assert images_of(alone) == images_of(post("sd", **body))

    results: dict[str, bytes] = {}

    def send(name: str, prompt: str, seed: int, steps: int = 2) -> None:
        answer = client.post(
            "/generate/sd",
            json={"prompt": prompt, "seed": seed, "steps": steps, "image_encoding": "png"},
        )
        (results[name],) = images_of(answer)

    # A long request holds the device; three quick ones with the same settings (other
    # prompts and seeds) arrive meanwhile and wait together.
    blocker = threading.Thread(target=send, args=("blocker", "a long one", 1, 40))
    blocker.start()
    deadline = time.monotonic() + 120
    while local.get("/_local/stats").json()["in_flight"] < 1:
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.01)
    quick = [
        threading.Thread(target=send, args=(f"q{i}", prompt, 10 + i))
        for i, prompt in enumerate(("a red kettle", "a blue kettle", "a green kettle"))
    ]
    for t in quick:
        t.start()
    for t in [blocker, *quick]:
        t.join()
    client.close()
    described = local.get("/_local/backend").json()
    # Five requests in three calls at most: the three quick ones shared one.
    assert described["requests_served"] == 5
    assert described["pipeline_calls"] <= 3

    # A batched image is its request's image, moved by at most a level or so.
    for i, prompt in enumerate(("a red kettle", "a blue kettle", "a green kettle")):
        (single,) = images_of(post("sd", prompt=prompt, seed=10 + i, steps=2, image_encoding="png"))
        diff = np.abs(_array(results[f"q{i}"]) - _array(single))
        assert float(diff.mean()) < 1.0, (prompt, float(diff.mean()), int(diff.max()))


def test_without_refiner_weights_use_refiner_is_ignored_and_said(
    batching_server: LocalOctoAIServer,
) -> None:
    local = _control(batching_server)
    described = local.get("/_local/backend").json()
    assert described["refiner"] is False
    assert any("use_refiner and high_noise_frac are ignored" in n for n in described["notes"])
    body = {"prompt": "a tower", "seed": 5, "steps": 2, "image_encoding": "png"}
    with _user(batching_server) as user:
        refined = user.post("/generate/sdxl", json={**body, "use_refiner": True})
        plain = user.post("/generate/sdxl", json={**body, "use_refiner": False})
    assert images_of(refined) == images_of(plain)


def test_engines_without_weights_answer_404_as_unknown_engines(
    batching_server: LocalOctoAIServer,
) -> None:
    described = _control(batching_server).get("/_local/backend").json()
    assert described["engines"] == ["sdxl", "sd", "controlnet-sdxl", "controlnet-sd15"]
    with _user(batching_server) as user:
        # The playground offers exactly the engines served (those it has inputs for).
        options = user.get("/playground/options.json").json()
        assert [e["name"] for e in options["engines"]] == ["sdxl", "sd"]
        for engine in ("ssd", "sd3", "flux-schnell", "flux-dev"):
            answer = user.post(f"/generate/{engine}", json={"prompt": "a tower", "steps": 2})
            assert answer.status_code == 404, answer.text
            assert answer.json()["message"] == (
                f"Engine {engine!r} not found; available: sdxl, sd, controlnet-sdxl, "
                "controlnet-sd15."
            )
        # Without IP-Adapter weights, photo merge stays a 422, and the server says why.
        answer = user.post(
            "/generate/sdxl",
            json={
                "prompt": "a sks tower",
                "transfer_images": {"sks": [sample_image_b64((64, 64))]},
            },
        )
    assert answer.status_code == 422
    assert "not supported by this server" in answer.json()["detail"][0]["msg"]
    assert any("photo merge) is not supported: no IP-Adapter" in n for n in described["notes"])
