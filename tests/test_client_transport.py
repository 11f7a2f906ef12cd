"""How calls reach the network: the client's own pool (requests handed straight to its
transport), an ``httpx`` client passed in, and a proxy named by the environment.

All three must put the same request on the wire; only ``httpx.Client`` honours proxy
variables, so with one set every call must go through it and reach the proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from _scripted_server import (
    Recorded,
    Reply,
    ScriptedServer,
    module_scripted_server,
    ok,
    server,
)

from dagster_octoai.api.client import AsyncOctoAIClient, HTTPRetryPolicy, OctoAIClient
from dagster_octoai.api.errors import ConnectionFailedError
from dagster_octoai.version import __version__

__all__ = ["module_scripted_server", "server"]

TOKEN = "sk-test-SECRET-transport-77"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
# The headers a call is defined by (Host and Content-Length follow from URL and body).
WIRE_HEADERS = ("authorization", "user-agent", "accept", "accept-encoding", "content-type")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy set on the test machine must not decide which path a test takes."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def _wire(recorded: Recorded) -> tuple[str, str, dict[str, str | None], bytes]:
    headers = {name: recorded.headers.get(name) for name in WIRE_HEADERS}
    return recorded.method, recorded.path, headers, recorded.body


@contextmanager
def _sync_client(kind: str, url: str) -> Iterator[OctoAIClient]:
    if kind == "passed-in":
        with httpx.Client() as http:
            yield OctoAIClient(TOKEN, base_url=url, http_client=http)
    else:
        with OctoAIClient(TOKEN, base_url=url) as client:
            yield client


def _calls(client: OctoAIClient) -> None:
    client.generate({"prompt": "a fox", "seed": 3})
    client.health()


def _reference(server: ScriptedServer) -> list[tuple[str, str, dict[str, str | None], bytes]]:
    """What the sync client's own pool sends for ``_calls``; the server is reset after."""
    server.default = ok([3])
    with _sync_client("own pool", server.url) as client:
        _calls(client)
    reference = [_wire(r) for r in server.requests]
    server.reset()
    server.default = ok([3])
    return reference


@pytest.mark.parametrize("kind", ["own pool", "passed-in"])
def test_every_path_sends_the_same_request(server: ScriptedServer, kind: str) -> None:
    reference = _reference(server)
    with _sync_client(kind, server.url) as client:
        _calls(client)
    assert [_wire(r) for r in server.requests] == reference
    method, path, headers, body = reference[0]
    assert (method, path) == ("POST", "/generate/sdxl")
    assert headers == {
        "authorization": f"Bearer {TOKEN}",
        "user-agent": f"dagster-octoai/{__version__}",
        "accept": "application/json",
        "accept-encoding": "gzip, deflate",
        "content-type": "application/json",
    }
    assert body.startswith(b"{") and b'"seed":3' in body


def test_async_client_sends_what_the_sync_client_sends(server: ScriptedServer) -> None:
    reference = _reference(server)

    async def main() -> None:
        async with AsyncOctoAIClient(TOKEN, base_url=server.url) as client:
            await client.generate({"prompt": "a fox", "seed": 3})
            await client.health()
        async with httpx.AsyncClient() as http:
            passed = AsyncOctoAIClient(TOKEN, base_url=server.url, http_client=http)
            await passed.generate({"prompt": "a fox", "seed": 3})
            await passed.health()

    asyncio.run(main())
    assert [_wire(r) for r in server.requests] == reference * 2


# A host that cannot resolve: reaching it at all proves the proxy carried the call.
UNRESOLVABLE = "http://octoai-upstream.invalid:8000"


def _through_proxy(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch, variable: str
) -> list[Recorded]:
    monkeypatch.setenv(variable, server.url)
    server.default = ok([5])
    with OctoAIClient(TOKEN, base_url=UNRESOLVABLE, retry=HTTPRetryPolicy.none()) as client:
        response = client.generate({"prompt": "a fox", "seed": 5})
    assert response.seeds == [5]
    return server.requests


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_proxy_in_the_environment_carries_every_call(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    (seen,) = _through_proxy(server, monkeypatch, variable)
    assert seen.path == "/generate/sdxl"
    assert seen.headers["host"] == "octoai-upstream.invalid:8000"
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"


def test_async_client_honours_the_proxy_too(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", server.url)
    server.default = ok([6])

    async def main() -> list[int]:
        async with AsyncOctoAIClient(TOKEN, base_url=UNRESOLVABLE) as client:
            return (await client.generate({"prompt": "a fox", "seed": 6})).seeds

    assert asyncio.run(main()) == [6]
    assert server.requests[0].headers["host"] == "octoai-upstream.invalid:8000"


def test_no_proxy_alone_keeps_calls_direct(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NO_PROXY only exempts hosts: with nothing else set the call goes to the host itself.
    monkeypatch.setenv("NO_PROXY", "example.com")
    server.default = ok([7])
    with OctoAIClient(TOKEN, base_url=server.url) as client:
        assert client.generate({"prompt": "a fox", "seed": 7}).seeds == [7]
    with (
        OctoAIClient(TOKEN, base_url=UNRESOLVABLE, retry=HTTPRetryPolicy.none()) as client,
        pytest.raises(ConnectionFailedError, match="could not connect"),
    ):
        client.generate({"prompt": "a fox"})
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda url: OctoAIClient(TOKEN, base_url=url, retry=HTTPRetryPolicy.none(), timeout=0.5),
        lambda url: OctoAIClient(
            TOKEN,
            base_url=url,
            retry=HTTPRetryPolicy.none(),
            timeout=0.5,
            http_client=httpx.Client(),
        ),
    ],
    ids=["own pool", "passed-in"],
)
def test_both_paths_map_a_read_timeout_the_same_way(
    server: ScriptedServer, make: Callable[[str], OctoAIClient]
) -> None:
    server.script(Reply(200, {"images": []}, delay_s=2.0))
    client = make(server.url)
    try:
        with pytest.raises(ConnectionFailedError, match="read timed out") as caught:
            client.generate({"prompt": "a fox"})
    finally:
        client._http.close()  # a passed-in client is the caller's to close
    assert TOKEN not in str(caught.value)
