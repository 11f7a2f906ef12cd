"""A diffusers server of its own for FLUX.1, SD3 and SSD-1B, on the session's tiny models.

Its own xdist group (``diffusers-engines`` in tests/conftest.py), so that these tests run
beside the rest of tests/diffusion/ on another worker instead of after them. The same
recipe as the parent directory's server (``serve_tiny_models``); the fixtures that talk to
a server (``post``, ``sdk``) are redefined here so that they talk to this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from octoai.client import OctoAI

from dagster_octoai.server import LocalOctoAIServer

from ..conftest import Generate, official_sdk, poster, serve_tiny_models


@pytest.fixture(scope="session")
def engines_server(tiny_models: Path) -> Iterator[LocalOctoAIServer]:
    yield from serve_tiny_models(tiny_models)


@pytest.fixture(scope="session")
def post(engines_server: LocalOctoAIServer) -> Iterator[Generate]:
    yield from poster(engines_server)


@pytest.fixture(scope="session")
def sdk(engines_server: LocalOctoAIServer) -> Iterator[OctoAI]:
    yield from official_sdk(engines_server)
