"""The diffusers backend's fixtures: tiny models written once, one server for the session.

The models are written by the real command (``dagster-octoai tiny-models DIR``, its
``main`` called in this process) and served by one diffusers-backend server (uvicorn in a thread of
this process) that every module here shares: loading torch and the models takes most
of a test's time on a small CPU, so it happens once.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from dagster_octoai.cli import main
from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.testing.plugin import TEST_TOKEN

#: Few steps: a test checks code paths and pixels' dependence on inputs, not quality.
STEPS = 2


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory written by ``dagster-octoai tiny-models``.

    ``DAGSTER_OCTOAI_TINY_MODELS=DIR`` reuses a directory the command wrote before (it
    saves a minute when re-running a few tests by hand; the suite never sets it).
    """
    reuse = os.environ.get("DAGSTER_OCTOAI_TINY_MODELS")
    if reuse:
        return Path(reuse)
    root = tmp_path_factory.mktemp("tiny-models") / "models"
    # The command itself, in this process (a child would import torch a second time).
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["tiny-models", str(root)]) == 0
    assert "serve them: dagster-octoai serve --backend diffusers --models" in out.getvalue()
    return root


@pytest.fixture(scope="session")
def diffusers_server(tiny_models: Path) -> Iterator[LocalOctoAIServer]:
    """One diffusers-backend server on the tiny models (CPU, fp32) for the session."""
    config = ServerConfig(
        token=TEST_TOKEN, backend="diffusers", models=str(tiny_models), device=("cpu",)
    )
    with LocalOctoAIServer(config, startup_timeout_s=900) as server:
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
