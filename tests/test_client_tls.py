"""HTTPS: certificates are verified, ``SSL_CERT_FILE`` is honoured, and every client of
the process shares one verification context (building one loads the CA bundle)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from _scripted_server import ScriptedServer, ok

from dagster_octoai.api._http import tls_context
from dagster_octoai.api.client import AsyncOctoAIClient, HTTPRetryPolicy, OctoAIClient
from dagster_octoai.api.errors import ConnectionFailedError

TOKEN = "sk-test-SECRET-tls-5150"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def https_server(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ScriptedServer]:
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = folder / "server.pem", folder / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    server = ScriptedServer()
    server.start(tls=(str(certfile), str(keyfile)))
    server.default = ok([9])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(autouse=True)
def clean_ca_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def test_an_unknown_certificate_is_refused(https_server: ScriptedServer) -> None:
    with (
        OctoAIClient(TOKEN, base_url=https_server.url, retry=HTTPRetryPolicy.none()) as client,
        pytest.raises(ConnectionFailedError, match="CERTIFICATE_VERIFY_FAILED") as caught,
    ):
        client.generate({"prompt": "a fox", "seed": 9})
    assert TOKEN not in str(caught.value)


def test_ssl_cert_file_is_honoured_by_both_clients(
    https_server: ScriptedServer, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    with OctoAIClient(TOKEN, base_url=https_server.url) as client:
        assert client.generate({"prompt": "a fox", "seed": 9}).seeds == [9]

    async def main() -> list[int]:
        async with AsyncOctoAIClient(TOKEN, base_url=https_server.url) as client:
            return (await client.generate({"prompt": "a fox", "seed": 9})).seeds

    assert asyncio.run(main()) == [9]


def test_clients_share_one_context_per_ca_setting(
    ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tls_context()
    assert tls_context() is default
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    custom = tls_context()
    assert custom is not default and tls_context() is custom
    subjects = [dict(item[0] for item in c["subject"]) for c in custom.get_ca_certs()]
    assert any("trustme" in s.get("organizationName", "") for s in subjects)
    monkeypatch.delenv("SSL_CERT_FILE")
    assert tls_context() is default


def test_a_new_client_builds_no_context_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    tls_context()  # the process's shared context exists
    built: list[object] = []
    real = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    for _ in range(3):
        OctoAIClient(TOKEN, base_url="https://127.0.0.1:9").close()

    async def main() -> None:
        await AsyncOctoAIClient(TOKEN, base_url="https://127.0.0.1:9").close()

    asyncio.run(main())
    assert built == []
