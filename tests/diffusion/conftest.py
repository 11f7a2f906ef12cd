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
from octoai.client import OctoAI
from octoai.environment import OctoAIEnvironment
from PIL import Image

from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.testing.plugin import TEST_TOKEN

#: Few steps: a test checks code paths and pixels' dependence on inputs, not quality.
STEPS = 2


def tiny_models_of(tiny_models: Path, folder: Path, *families: str) -> Path:
    """``folder`` holding only ``families``' folders of the tiny models (links to them).

    For a test that builds a backend of its own (the GPU benchmark's): a backend loads every
    family of its directory when it starts, the ones the test never asks for too.
    """
    folder.mkdir()
    for family in families:
        (folder / family).symlink_to(tiny_models / family, target_is_directory=True)
    return folder


def serve_tiny_models(tiny_models: Path) -> Iterator[LocalOctoAIServer]:
    """A diffusers-backend server on the tiny models (CPU, fp32), for a session fixture.

    The one recipe of both servers here: this directory's and ``tests/diffusion/engines``'s
    (``yield from serve_tiny_models(tiny_models)``).
    """
    config = ServerConfig(
        token=TEST_TOKEN, backend="diffusers", models=str(tiny_models), device=("cpu",)
    )
    with LocalOctoAIServer(config) as server:  # 900 s: the diffusers default
        yield server


Generate = Callable[..., httpx.Response]


def poster(server: LocalOctoAIServer) -> Iterator[Generate]:
    """``post(engine, **body)``: a generate request to ``server`` (steps default 2)."""
    client = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=600
    )

    def call(engine: str, **body: Any) -> httpx.Response:
        body.setdefault("steps", STEPS)
        return client.post(f"/generate/{engine}", json=body)

    try:
        yield call
    finally:
        client.close()


def official_sdk(server: LocalOctoAIServer) -> Iterator[OctoAI]:
    """OctoAI's own SDK, pointed at ``server``."""
    env = OctoAIEnvironment(default=server.url, image_gen=server.url, text_gen=server.url)
    http = httpx.Client(headers={"Authorization": f"Bearer {server.token}"}, timeout=600)
    try:
        yield OctoAI(api_key=server.token, environment=env, httpx_client=http, timeout=600)
    finally:
        http.close()


@pytest.fixture(scope="session")
def diffusers_server(tiny_models: Path) -> Iterator[LocalOctoAIServer]:
    """One diffusers-backend server on the tiny models for the session."""
    yield from serve_tiny_models(tiny_models)


@pytest.fixture(scope="session")
def post(diffusers_server: LocalOctoAIServer) -> Iterator[Generate]:
    yield from poster(diffusers_server)


@pytest.fixture(scope="session")
def sdk(diffusers_server: LocalOctoAIServer) -> Iterator[OctoAI]:
    yield from official_sdk(diffusers_server)


def images_of(response: httpx.Response) -> list[bytes]:
    """The decoded image bytes of a 200 generation answer (asserting it is one)."""
    assert response.status_code == 200, response.text
    return [base64.b64decode(im["image_b64"]) for im in response.json()["images"]]


def pil(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
