"""A diffusers server of its own for FLUX.1, SD3 and SSD-1B, on the session's tiny models.

Its own xdist group (``diffusers-engines`` in tests/conftest.py), so that these tests run
beside the rest of tests/diffusion/ on the other core instead of after them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.testing.plugin import TEST_TOKEN

from ..conftest import STEPS, Generate


@pytest.fixture(scope="session")
def engines_server(tiny_models: Path) -> Iterator[LocalOctoAIServer]:
    config = ServerConfig(
        token=TEST_TOKEN, backend="diffusers", models=str(tiny_models), device=("cpu",)
    )
    with LocalOctoAIServer(config) as server:
        yield server


@pytest.fixture(scope="session")
def post(engines_server: LocalOctoAIServer) -> Iterator[Generate]:
    """``post(engine, **body)``: a generate request (steps default 2)."""
    client = httpx.Client(
        base_url=engines_server.url,
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
