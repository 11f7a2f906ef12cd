"""The diffusers backend's fixtures: one server for the session, on the tiny models.

The models are written once per run by the real command (``tiny_models`` in
tests/conftest.py) and served by one diffusers-backend server (uvicorn in a thread of
this process) that every module here shares: loading torch and the models takes most
of a test's time on a small CPU, so it happens once. For the same reason every test
here runs in one xdist worker (the ``diffusers`` group of tests/conftest.py).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.testing.plugin import TEST_TOKEN

#: Few steps: a test checks code paths and pixels' dependence on inputs, not quality.
STEPS = 2


@pytest.fixture(scope="session")
def diffusers_server(tiny_models: Path) -> Iterator[LocalOctoAIServer]:
    """One diffusers-backend server on the tiny models (CPU, fp32) for the session."""
    config = ServerConfig(
        token=TEST_TOKEN, backend="diffusers", models=str(tiny_models), device=("cpu",)
    )
    with LocalOctoAIServer(config) as server:  # 900 s: the diffusers default
        yield server


Generate = Callable[..., httpx.Response]


@pytest.fixture(scope="session")
def post(diffusers_server: LocalOctoAIServer) -> Iterator[Generate]:
    """``post(engine, **body)``: a generate request to the diffusers server (steps default 2)."""
    client = httpx.Client(
        base_url=diffusers_server.url,
        headers={"Authorization": f"Bearer {TEST_TOKEN}"},
        timeout=600,
    )

    def call(engine: str, **body: Any) -> httpx.Response:
        body.setdefault("steps", STEPS)
        return client.post(f"/generate/{engine}", json=body)

    try:
        yield call
    finally:
        client.close()


def images_of(response: httpx.Response) -> list[bytes]:
    """The decoded image bytes of a 200 generation answer (asserting it is one)."""
    assert response.status_code == 200, response.text
    return [base64.b64decode(im["image_b64"]) for im in response.json()["images"]]


def pil(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
