"""The pytest plugin registered by the ``pytest11`` entry point (fixtures for users' tests).

Fixtures:

- ``octoai_server``: one instant server for the whole session, token ``"test-token-0c7f3e9a"``.
  Shared: read its stats as differences, and use the factory to change its behaviour.
- ``octoai_server_factory``: call it with :class:`~dagster_octoai.server.ServerConfig`
  fields (``latency_per_image_s=0.2, replicas=2, faults=FaultConfig(...)`` ...) for a
  server of your own, started at once and stopped after the test.

Both turn the ``/_local`` control routes on (``stats()``, ``configure()``, ...), behind
the admin token ``TEST_ADMIN_TOKEN``: a test server, unlike ``dagster-octoai serve``, is
there to be inspected. Pass ``control_routes=False`` to the factory for a server as an
endpoint runs it.

The server needs the ``server`` extra (Starlette, uvicorn); the imports happen inside
the fixtures, so installing the plugin costs a test run nothing when they are unused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import pytest

if TYPE_CHECKING:
    from ..server import LocalOctoAIServer

TEST_TOKEN = "test-token-0c7f3e9a"
#: The admin token of the fixtures' control routes (never an API token).
TEST_ADMIN_TOKEN = "test-admin-token-4d2b8e61"


@pytest.fixture(scope="session")
def octoai_server() -> Iterator[LocalOctoAIServer]:
    """An instant local OctoAI server (token ``"test-token-0c7f3e9a"``) shared by the session."""
    from ..server import LocalOctoAIServer, ServerConfig

    config = ServerConfig(
        token=TEST_TOKEN,
        latency_per_image_s=0.0,
        control_routes=True,
        admin_token=TEST_ADMIN_TOKEN,
    )
    with LocalOctoAIServer(config) as server:
        yield server


@pytest.fixture
def octoai_server_factory() -> Iterator[Callable[..., LocalOctoAIServer]]:
    """Make started servers from ``ServerConfig`` fields; all stop when the test ends.

    The token defaults to ``"test-token-0c7f3e9a"``; pass ``mode="process"`` for a server in a
    child process.

    Examples:
        def test_queueing(octoai_server_factory):
            srv = octoai_server_factory(latency_per_image_s=0.3, replicas=2)
            ...
    """
    from ..server import LocalOctoAIServer, ServerConfig

    servers: list[LocalOctoAIServer] = []

    def make(mode: Literal["thread", "process"] = "thread", **fields: Any) -> LocalOctoAIServer:
        fields.setdefault("token", TEST_TOKEN)
        fields.setdefault("control_routes", True)
        if fields["control_routes"]:
            fields.setdefault("admin_token", TEST_ADMIN_TOKEN)
        server = LocalOctoAIServer(
            ServerConfig(**fields), mode=mode, controls=bool(fields["control_routes"])
        )
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


# The S3 fixtures: one SeaweedFS for the session, a fresh bucket per test.
from .seaweedfs import s3_bucket as s3_bucket, seaweedfs as seaweedfs  # noqa: E402
