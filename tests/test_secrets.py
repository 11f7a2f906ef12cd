"""The token in every form it can take: never in an error, a log, a run's events or a repr.

A server that echoes what it was sent (the ``Authorization`` header) is the worst case:
the token then comes back URL-encoded, JSON-escaped with ``\\/``, HTML-escaped, inside
base64, in error bodies and in answers the client cannot parse. The scanner of
``devtools.secrets`` looks for the token in each form, plain and encoded.
"""

# No `from __future__ import annotations`: Dagster reads the assets' annotations.

import base64
import html
import json
import logging
import re
from collections.abc import Callable, Iterator
from urllib.parse import quote, quote_plus

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
from dagster import AssetExecutionContext, DagsterInstance, asset, materialize

from dagster_octoai.api import errors
from dagster_octoai.api._http import Call, Redactor
from dagster_octoai.api.client import HTTPRetryPolicy, OctoAIClient, origin_of
from dagster_octoai.api.models import AsyncJob, ImageGenerationRequest
from dagster_octoai.resources import JobLedgerResource, OctoAIResource
from devtools.secrets import TokenScanner

__all__ = ["module_scripted_server", "server"]  # fixtures used by this module

pytestmark = pytest.mark.timeout(120)

#: A token with the characters encoders change: '/', '+', '=', '&'.
TOKEN = "sk-LEAK/CHECK+9f3b=2c7d&41e8a6b5"
SCANNER = TokenScanner(TOKEN)
FAST = HTTPRetryPolicy(max_attempts=1, deadline_s=30)

#: Every form of the token a server, a proxy or a library could write into a text.
FORMS: dict[str, Callable[[str], str]] = {
    "plain": lambda t: t,
    "url-encoded": lambda t: quote(t, safe=""),
    "url-encoded keeping /": quote,
    "form-encoded": quote_plus,
    "url-encoded twice": lambda t: quote(quote(t, safe=""), safe=""),
    "lowercase percent-encoding": lambda t: re.sub(
        "%[0-9A-F]{2}", lambda m: m.group().lower(), quote(t, safe="")
    ),
    "json": lambda t: json.dumps(t)[1:-1],
    "json with \\/": lambda t: json.dumps(t)[1:-1].replace("/", "\\/"),
    "json \\u escapes": lambda t: "".join(f"\\u{ord(c):04x}" for c in t),
    "json in json": lambda t: json.dumps(json.dumps(t))[1:-1],
    "python repr of bytes": lambda t: repr(t.encode())[2:-1],
    "html": html.escape,
    "html character references": lambda t: "".join(f"&#{ord(c)};" for c in t),
    "base64 basic auth": lambda t: base64.b64encode(f"user:{t}".encode()).decode(),
}


@pytest.fixture
def client(server: ScriptedServer) -> Iterator[OctoAIClient]:
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, timeout=10) as c:
        yield c


# ---- the redactor ----------------------------------------------------------------------


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_of_the_token_is_redacted(form: str) -> None:
    echoed = FORMS[form](TOKEN)
    text = f"401 for Authorization: Bearer {echoed} (retry later)"
    redacted = Redactor(TOKEN).text(text)
    assert SCANNER.scan_text(redacted, form) == []
    assert echoed not in redacted
    assert redacted.startswith("401 for Authorization: Bearer ")
    assert redacted.endswith(" (retry later)")
    assert Redactor(TOKEN).contains(text) and not Redactor(TOKEN).contains(redacted)


def test_a_short_token_is_hidden_where_it_stands_alone_and_never_garbles_words() -> None:
    redactor = Redactor("t")
    assert redactor.text("POST /generate/sd answered 401") == "POST /generate/sd answered 401"
    assert redactor.text("Authorization: Bearer t") == "Authorization: Bearer ***"
    assert redactor.text('{"token": "t"}') == '{"token": "***"}'
    assert Redactor("abc123").text("xabc123 abc1234 abc123.") == "xabc123 abc1234 ***."


def test_a_token_that_cannot_be_a_bearer_token_is_refused_without_showing_it() -> None:
    for bad in ("sk-abc\x01def", "sk-abcdé", "sk abc def"):
        with pytest.raises(errors.RequestValidationError) as info:
            OctoAIClient(bad, base_url="http://127.0.0.1:9")
        assert "bearer token" in str(info.value)
        assert bad.split()[0] not in str(info.value) and "abc" not in str(info.value)


def test_a_transport_error_holding_the_token_is_not_chained() -> None:
    call = Call(
        method="GET",
        url="http://127.0.0.1:9/v1/requests/x",
        kind="poll",
        policy=HTTPRetryPolicy(max_attempts=1),
        timeout=httpx.Timeout(1.0),
        redactor=Redactor(TOKEN),
    )
    call.start_attempt()
    leaky = httpx.UnsupportedProtocol(f"Request URL has an unsupported scheme: {quote(TOKEN)}")
    with pytest.raises(errors.ConnectionFailedError) as info:
        call.on_transport_error(leaky)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert SCANNER.scan_exception(info.value) == []
    clean = httpx.UnsupportedProtocol("Request URL has an unsupported scheme 'ftp://'")
    with pytest.raises(errors.ConnectionFailedError) as info:
        call.on_transport_error(clean)
    assert info.value.__cause__ is clean  # a clean cause stays, for debugging


# ---- a server that echoes the token ------------------------------------------------------


def _echo(status: int, form: str, content_type: str = "application/json") -> Reply:
    def reply(request: Recorded) -> Reply:
        token = request.headers["authorization"].removeprefix("Bearer ")
        said = FORMS[form](token)
        if "json" in content_type:
            body: str = json.dumps({"message": f"bad token {said}", "echo": said})
            body = body.replace(json.dumps(said)[1:-1], said)  # the form as is, not re-escaped
        else:
            body = f"<html><title>denied {said}</title><body>{said}</body></html>"
        return Reply(status, body, content_type=content_type)

    return reply  # type: ignore[return-value]


@pytest.mark.parametrize("form", ["url-encoded", "json with \\/", "html", "base64 basic auth"])
@pytest.mark.parametrize(
    ("status", "content_type", "error"),
    [
        (401, "application/json", errors.AuthenticationError),
        (502, "text/html", errors.ServerError),
        (200, "text/html", errors.ResponseFormatError),
        (200, "application/json", errors.ResponseFormatError),
    ],
)
def test_an_echoed_token_never_reaches_the_error(
    server: ScriptedServer,
    client: OctoAIClient,
    caplog: pytest.LogCaptureFixture,
    form: str,
    status: int,
    content_type: str,
    error: type[errors.OctoAIError],
) -> None:
    caplog.set_level(logging.DEBUG)
    server.default = _echo(status, form, content_type)  # type: ignore[assignment]
    with pytest.raises(error) as info:
        client.generate({"prompt": "a fox"})
    assert SCANNER.scan_exception(info.value) == []
    assert SCANNER.scan_text(caplog.text, "log") == []


# ---- where the token is sent ------------------------------------------------------------


def _submitted(url: str) -> Reply:
    return Reply(201, {"response_id": "r-1", "poll_url": url})


def test_a_poll_url_on_another_origin_gets_no_token(server: ScriptedServer) -> None:
    # localhost and 127.0.0.1 reach the same server, but are different origins.
    other = server.url.replace("127.0.0.1", "localhost")
    server.script(_submitted(f"{other}/v1/requests/r-1"))
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, timeout=10) as client:
        job = client.submit({"prompt": "a fox"})
        assert job.response_id == "r-1"  # the paid job is kept: the ledger records it
        with pytest.raises(errors.UntrustedOriginError, match="trusted_origins") as info:
            client.poll(job)
    assert info.value.origin == origin_of(other)
    assert server.paths() == ["POST /generate/sdxl"]  # nothing went to the other origin

    server.script(Reply(200, {"status": "completed", "response_url": f"{other}/v1/r/r-1"}), ok())
    with OctoAIClient(
        TOKEN, base_url=server.url, retry=FAST, timeout=10, trusted_origins=[other]
    ) as trusting:
        assert trusting.fetch(job).seeds == [42]
    assert [r.headers["authorization"] for r in server.requests[1:]] == [f"Bearer {TOKEN}"] * 2


def test_a_response_url_on_another_origin_gets_no_token(server: ScriptedServer) -> None:
    other = server.url.replace("127.0.0.1", "localhost")
    job = AsyncJob(
        response_id="r-2",
        poll_url=f"{server.url}/v1/requests/r-2",
        request=ImageGenerationRequest(prompt="a fox"),
    )
    completed = Reply(200, {"status": "completed", "response_url": f"{other}/v1/r/r-2"})
    server.script(completed, completed)
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, timeout=10) as client:
        with pytest.raises(errors.UntrustedOriginError, match="response_url of async job r-2"):
            client.fetch(job)
        with pytest.raises(errors.UntrustedOriginError):
            client.fetch(f"{other}/v1/r/r-2")
        with pytest.raises(errors.UntrustedOriginError):
            client.wait(job, timeout=5)
    assert server.paths() == ["GET /v1/requests/r-2"] * 2  # the polls; no fetch went out


def test_trusted_origins_must_be_origins() -> None:
    with pytest.raises(errors.RequestValidationError, match="trusted_origins"):
        OctoAIClient(TOKEN, base_url="http://127.0.0.1:9", trusted_origins=["https://x/path"])
    client = OctoAIClient(TOKEN, base_url="https://image.octoai.run")
    # The historical service answered polls from its async host.
    assert "https://async.octoai.run:443" in client.trusted_origins


def test_the_resource_passes_trusted_origins_to_its_client(server: ScriptedServer) -> None:
    other = server.url.replace("127.0.0.1", "localhost")
    resource = OctoAIResource(token=TOKEN, base_url=server.url, trusted_origins=[other])
    assert resource.client.trusted_origins == {origin_of(server.url), origin_of(other)}


# ---- Dagster: the run database and reprs ----------------------------------------------------


@asset
def fox(context: AssetExecutionContext, octoai: OctoAIResource) -> None:
    with octoai.get_client(context) as session:
        session.generate({"prompt": "a fox"})


def test_an_echoed_token_never_reaches_the_run_database(server: ScriptedServer) -> None:
    server.default = _echo(200, "json with \\/", "text/html")  # type: ignore[assignment]
    with DagsterInstance.ephemeral() as instance:
        result = materialize(
            [fox],
            instance=instance,
            resources={"octoai": OctoAIResource(token=TOKEN, base_url=server.url, max_attempts=1)},
            raise_on_error=False,
        )
        assert not result.success
        leaks, events = SCANNER.scan_instance(instance)
    assert events > 0 and leaks == []
    assert len(server.requests) == 1


def test_resource_reprs_hide_the_s3_secret_key() -> None:
    secret = "SECRET-access-key-0123456789"
    ledger = JobLedgerResource(bucket="images", aws_secret_access_key=secret)
    for text in (repr(ledger), str(ledger)):
        assert secret not in text
    schema = JobLedgerResource.model_json_schema()["properties"]["aws_secret_access_key"]
    assert schema.get("dagster__is_secret") is True
