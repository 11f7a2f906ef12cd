"""OctoAIClient over real loopback HTTP, against a server scripted per test."""

from __future__ import annotations

import base64
import doctest
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from _scripted_server import (
    Recorded,
    Reply,
    ScriptedServer,
    generation_body,
    jpeg_bytes,
    module_scripted_server,
    ok,
    scripted_server,
    server,
)
from pydantic import SecretStr

from dagster_octoai.api import _retry, client as client_module, errors
from dagster_octoai.api.client import DEFAULT_BASE_URL, HTTPRetryPolicy, OctoAIClient
from dagster_octoai.api.models import AsyncJob, Engine, ImageGenerationRequest, JobStatus
from dagster_octoai.version import __version__

TOKEN = "sk-test-SECRET-0123456789"
FAST = HTTPRetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, deadline_s=30)

__all__ = ["module_scripted_server", "server"]  # fixtures used by this module

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(server: ScriptedServer) -> Iterator[OctoAIClient]:
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, timeout=10) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---- construction ------------------------------------------------------------------------


def test_repr_hides_token_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OCTOAI_BASE_URL", raising=False)
    client = OctoAIClient(TOKEN)
    try:
        assert repr(client) == f"OctoAIClient(base_url={DEFAULT_BASE_URL!r}, token=***)"
        assert TOKEN not in repr(client) and TOKEN not in str(vars(client).get("_redactor"))
        # The hosted service has closed: the default is where `dagster-octoai serve` listens.
        assert client.base_url == "http://127.0.0.1:8000"
        assert client.max_concurrency == 4
        assert client.retry == HTTPRetryPolicy()
    finally:
        client.close()


@pytest.mark.parametrize("cls", [OctoAIClient, client_module.AsyncOctoAIClient])
def test_the_token_is_never_held_in_clear_where_a_debugger_looks(cls: Any) -> None:
    client = cls(TOKEN, base_url="http://127.0.0.1:9")
    # What a debugger's variables view shows: each attribute and one level inside it
    # (but inside the SecretStr itself, which is what holds the token).
    shown = [repr(vars(client)), str(vars(client))]
    for value in vars(client).values():
        shown.append(repr(value))
        if isinstance(value, SecretStr):
            continue
        shown += [repr(v) for v in getattr(value, "__dict__", {}).values()]
        if isinstance(value, dict):
            shown += [repr(v) for v in value.values()]
    assert all(TOKEN not in text for text in shown)
    assert isinstance(client._token, SecretStr) and client._token.get_secret_value() == TOKEN


def test_token_from_environment_and_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCTOAI_TOKEN", "env-token")
    with OctoAIClient() as client:
        assert client._token.get_secret_value() == "env-token"
    monkeypatch.delenv("OCTOAI_TOKEN")
    with pytest.raises(errors.RequestValidationError, match="OCTOAI_TOKEN") as info:
        OctoAIClient()
    assert info.value.errors[0]["field"] == "token"


def test_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCTOAI_BASE_URL", "http://images.internal:8080/")
    with OctoAIClient(TOKEN) as client:
        assert client.base_url == "http://images.internal:8080"
    with OctoAIClient(TOKEN, base_url="http://127.0.0.1:9") as client:
        assert client.base_url == "http://127.0.0.1:9"  # an argument wins over the variable
    monkeypatch.setenv("OCTOAI_BASE_URL", "images.internal")
    with pytest.raises(errors.RequestValidationError, match="OCTOAI_BASE_URL") as info:
        OctoAIClient(TOKEN)
    assert info.value.errors[0]["field"] == "OCTOAI_BASE_URL"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_url": "image.octoai.run"}, "base_url"),
        ({"base_url": "ftp://x"}, "base_url"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_bad_construction_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.RequestValidationError, match=field):
        OctoAIClient(TOKEN, **kwargs)


def test_retry_policy_validates() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        HTTPRetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        HTTPRetryPolicy(unknown=1)  # type: ignore[call-arg]


# ---- generate ----------------------------------------------------------------------------


def test_generate_sends_the_wire_body_and_headers(
    server: ScriptedServer, client: OctoAIClient
) -> None:
    server.script(ok([7], request_id="req-1"))
    request = ImageGenerationRequest(prompt="a red fox", steps=20, seed=7, sampler="K_EULER")
    response = client.generate(request)

    (sent,) = server.requests
    assert sent.method == "POST" and sent.path == "/generate/sdxl"
    assert sent.json() == {"prompt": "a red fox", "steps": 20, "seed": 7, "sampler": "K_EULER"}
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    assert sent.headers["user-agent"] == f"dagster-octoai/{__version__}"
    assert sent.headers["content-type"] == "application/json"
    assert "x-octoai-async" not in sent.headers
    assert response.seeds == [7]
    assert response.images[0].data == jpeg_bytes()
    assert response.images[0].format == "jpeg"
    assert response.prediction_time_ms == 12.5
    assert response.call_info.attempts == 1
    assert response.call_info.request_ids == ("req-1",)


def test_generate_takes_a_dict_and_an_engine(server: ScriptedServer, client: OctoAIClient) -> None:
    server.default = ok()
    client.generate({"prompt": "a fox", "width": 512, "height": 768}, engine="sd")
    client.generate({"prompt": "a fox", "engine": Engine.SD})
    cn = {"prompt": "edges", "controlnet": "octoai:canny_sdxl", "controlnet_image": jpeg_bytes()}
    client.generate(cn, engine="controlnet-sd")  # the older SDK's alias
    client.generate(cn, engine="controlnet-sdxl")
    assert server.paths() == [
        "POST /generate/sd",
        "POST /generate/sd",
        "POST /generate/controlnet-sd15",
        "POST /generate/controlnet-sdxl",
    ]
    assert server.requests[0].json() == {"prompt": "a fox", "width": 512, "height": 768}
    assert base64.b64decode(server.requests[2].json()["controlnet_image"]) == jpeg_bytes()


def test_invalid_request_is_refused_before_sending(
    server: ScriptedServer, client: OctoAIClient
) -> None:
    with pytest.raises(errors.RequestValidationError) as info:
        client.generate({"prompt": "x", "width": 512, "style_preset": "anime"}, engine="sd")
    text = str(info.value)
    assert "height" in text and "style_preset" in text
    assert {e["field"] for e in info.value.errors} == {"height", "style_preset"}
    with pytest.raises(errors.RequestValidationError, match="steps"):
        client.generate({"prompt": "x", "steps": 500})
    assert server.requests == []


def test_base_url_with_a_path_prefix(server: ScriptedServer) -> None:
    server.script(ok())
    with OctoAIClient(TOKEN, base_url=server.url + "/octo/", retry=FAST) as client:
        client.generate({"prompt": "a fox"})
    assert server.paths() == ["POST /octo/generate/sdxl"]


def test_blocked_images_are_kept_and_extra_keys_tolerated(
    server: ScriptedServer, client: OctoAIClient
) -> None:
    body = generation_body([1, 2], removed={2})
    body["finish_reason"] = "ok"
    body["images"][0]["extra"] = True
    server.script(Reply(200, body))
    response = client.generate({"prompt": "a fox", "num_images": 2})
    assert response.seeds == [1, 2]
    assert response.removed_count == 1
    blocked = response.images[1]
    assert blocked.removed_for_safety and not blocked.available
    with pytest.raises(errors.ImageRemovedForSafetyError):
        _ = blocked.data


def test_bad_base64_surfaces_when_read(server: ScriptedServer, client: OctoAIClient) -> None:
    body = generation_body([3])
    body["images"][0]["image_b64"] = "not*base64!"
    server.script(Reply(200, body))
    response = client.generate({"prompt": "a fox"})
    with pytest.raises(errors.ImageDecodeError, match="seed 3"):
        _ = response.images[0].data


# ---- retries -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(
    server: ScriptedServer, client: OctoAIClient, status: int
) -> None:
    server.script(
        Reply(status, {"message": "busy"}, headers={"X-User-Request-ID": "a"}),
        ok(request_id="b"),
    )
    response = client.generate({"prompt": "a fox"})
    assert len(server.requests) == 2
    assert server.requests[0].body == server.requests[1].body
    assert response.call_info.attempts == 2
    assert response.call_info.retries == 1
    assert response.call_info.request_ids == ("a", "b")


def test_retry_logs_a_warning_without_the_token(
    server: ScriptedServer, client: OctoAIClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script(Reply(503, {"message": f"echo Bearer {TOKEN}"}), ok())
    client.generate({"prompt": "a fox"})
    warnings = [
        r
        for r in caplog.records
        if r.name == "dagster_octoai.api.client" and r.levelname == "WARNING"
    ]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert "status 503" in line and "attempt 1/5" in line and "retrying in" in line
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (429, errors.RateLimitError),
        (500, errors.ServerError),
        (503, errors.ServerError),
    ],
)
def test_retries_run_out(
    server: ScriptedServer, status: int, cls: type[errors.APIStatusError]
) -> None:
    server.default = Reply(status, {"message": "nope"}, headers={"X-User-Request-ID": "rid"})
    policy = HTTPRetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    with (
        OctoAIClient(TOKEN, base_url=server.url, retry=policy) as client,
        pytest.raises(cls) as info,
    ):
        client.generate({"prompt": "a fox"})
    assert len(server.requests) == 3
    assert info.value.status_code == status
    assert info.value.request_id == "rid"
    assert "gave up after 3 attempts" in str(info.value)


def test_rate_limit_error_carries_retry_after(server: ScriptedServer) -> None:
    server.default = Reply(429, {"message": "slow down"}, headers={"Retry-After": "0"})
    with (
        OctoAIClient(TOKEN, base_url=server.url, retry=HTTPRetryPolicy(max_attempts=2)) as client,
        pytest.raises(errors.RateLimitError) as info,
    ):
        client.generate({"prompt": "a fox"})
    assert info.value.retry_after == 0.0
    assert len(server.requests) == 2


def test_retry_after_seconds_is_honoured(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(Reply(429, {"message": "slow down"}, headers={"Retry-After": "1"}), ok())
    client.generate({"prompt": "a fox"})
    first, second = server.requests
    # The backoff alone would wait at most 0.01 s.
    assert second.at - first.at >= 0.9


def test_retry_after_http_date_is_honoured(server: ScriptedServer, client: OctoAIClient) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=2)
    header = format_datetime(when, usegmt=True)
    server.script(Reply(503, "", headers={"Retry-After": header}), ok())
    client.generate({"prompt": "a fox"})
    first, second = server.requests
    assert second.at - first.at >= 0.9  # whole seconds in an HTTP date: 1..2 s left


def test_retry_after_over_the_cap_is_not_waited(server: ScriptedServer) -> None:
    server.default = Reply(429, {"message": "quota"}, headers={"Retry-After": "3600"})
    policy = HTTPRetryPolicy(max_retry_after_s=5)
    with (
        OctoAIClient(TOKEN, base_url=server.url, retry=policy) as client,
        pytest.raises(errors.RateLimitError) as info,
    ):
        client.generate({"prompt": "a fox"})
    assert info.value.retry_after == 3600
    assert "max_retry_after_s" in str(info.value)
    assert len(server.requests) == 1


def test_a_wait_past_the_deadline_is_not_started(server: ScriptedServer) -> None:
    server.default = Reply(503, {"message": "busy"}, headers={"Retry-After": "30"})
    policy = HTTPRetryPolicy(deadline_s=2)
    with OctoAIClient(TOKEN, base_url=server.url, retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(errors.ServerError, match="deadline"):
            client.generate({"prompt": "a fox"})
    assert len(server.requests) == 1
    assert time.monotonic() - started < 2


def test_deadline_cuts_a_slow_attempt(server: ScriptedServer) -> None:
    server.default = Reply(200, generation_body(), delay_s=5)
    policy = HTTPRetryPolicy(deadline_s=0.5)
    with (
        OctoAIClient(TOKEN, base_url=server.url, retry=policy, timeout=30) as client,
        pytest.raises(errors.DeadlineExceededError, match="deadline"),
    ):
        client.generate({"prompt": "a fox"})
    assert len(server.requests) == 1


def test_read_timeout_is_retried(server: ScriptedServer) -> None:
    server.script(Reply(200, generation_body(), delay_s=2), ok([5]))
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, timeout=0.3) as client:
        response = client.generate({"prompt": "a fox"})
    assert response.seeds == [5]
    assert response.call_info.attempts == 2


def test_dropped_connection_is_retried(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(Reply(200, generation_body(), drop=True), ok([9]))
    response = client.generate({"prompt": "a fox"})
    assert response.seeds == [9]
    assert len(server.requests) == 2


def test_dropped_every_time_raises_connection_failed(server: ScriptedServer) -> None:
    server.default = Reply(200, generation_body(), drop=True)
    policy = HTTPRetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    with (
        OctoAIClient(TOKEN, base_url=server.url, retry=policy) as client,
        pytest.raises(errors.ConnectionFailedError, match="dropped") as info,
    ):
        client.generate({"prompt": "a fox"})
    assert "gave up after 3 attempts" in str(info.value)
    assert len(server.requests) == 3


def test_connection_refused_is_retried_then_raised(caplog: pytest.LogCaptureFixture) -> None:
    policy = HTTPRetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    caplog.set_level(logging.WARNING, logger="dagster_octoai.api.client")
    url = f"http://127.0.0.1:{free_port()}"
    with (
        OctoAIClient(TOKEN, base_url=url, retry=policy) as client,
        pytest.raises(errors.ConnectionFailedError, match="could not connect") as info,
    ):
        client.generate({"prompt": "a fox"})
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2
    # The error names where it tried to connect, and what to check.
    message = str(info.value)
    assert f"could not connect to {url.removeprefix('http://')} (" in message
    assert "nothing is listening there: check base_url (or OCTOAI_BASE_URL)" in message


def test_unresolvable_host_is_named_with_its_port() -> None:
    with (
        OctoAIClient(
            TOKEN, base_url="https://no-such-host.invalid", retry=HTTPRetryPolicy.none()
        ) as c,
        pytest.raises(errors.ConnectionFailedError) as info,
    ):
        c.generate({"prompt": "a fox"})
    message = str(info.value)
    assert "POST /generate/sdxl: could not connect to no-such-host.invalid:443" in message
    assert "the host name does not resolve" in message


# ---- error mapping -----------------------------------------------------------------------

POLICY = {"message": "This request violates our Acceptable Use Policy."}
DETAIL = {
    "detail": [
        {"loc": ["body", "steps"], "msg": "ensure this value is less than 200", "type": "x"},
        {"loc": ["body", "cfg_scale"], "msg": "must be positive", "type": "y"},
    ]
}


@pytest.mark.parametrize(
    ("reply", "cls", "needle"),
    [
        (Reply(400, POLICY), errors.PolicyViolationError, "Acceptable Use Policy"),
        (Reply(400, {"message": "bad image"}), errors.BadRequestError, "bad image"),
        (Reply(401, {"message": "invalid token"}), errors.AuthenticationError, "OCTOAI_TOKEN"),
        (Reply(403, {"message": "forbidden"}), errors.PermissionDeniedError, "forbidden"),
        (Reply(404, {"detail": "Not Found"}), errors.NotFoundError, "unknown engine"),
        (Reply(422, DETAIL), errors.UnprocessableEntityError, "steps: ensure this value"),
        (Reply(409, {"message": "conflict"}), errors.APIStatusError, "409"),
        (Reply(501, "not implemented"), errors.ServerError, "not implemented"),
    ],
)
def test_error_statuses_are_mapped_and_not_retried(
    server: ScriptedServer,
    client: OctoAIClient,
    reply: Reply,
    cls: type[errors.APIStatusError],
    needle: str,
) -> None:
    reply.headers["X-User-Request-ID"] = "req-err"
    server.script(reply)
    with pytest.raises(cls) as info:
        client.generate({"prompt": "a fox"})
    err = info.value
    assert type(err) is cls
    assert needle in str(err)
    assert err.status_code == reply.status
    assert err.request_id == "req-err"
    assert "request_id=req-err" in str(err)
    assert len(server.requests) == 1


def test_422_detail_is_kept(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(Reply(422, DETAIL))
    with pytest.raises(errors.UnprocessableEntityError) as info:
        client.generate({"prompt": "a fox"})
    assert [d["loc"][-1] for d in info.value.detail] == ["steps", "cfg_scale"]
    assert "cfg_scale: must be positive" in str(info.value)


def test_the_token_is_redacted_from_error_text_and_body(
    server: ScriptedServer, client: OctoAIClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def echo(request: Recorded) -> Reply:
        return Reply(401, {"message": f"bad credentials: {request.headers['authorization']}"})

    server.script(echo)
    with pytest.raises(errors.AuthenticationError) as info:
        client.generate({"prompt": "a fox"})
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value)
    assert "Bearer ***" in str(info.value)
    assert TOKEN not in str(info.value.body)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


# ---- corrupt answers ---------------------------------------------------------------------

HTML = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (Reply(200, "{not json", content_type="application/json"), "not valid JSON"),
        (Reply(200, HTML, content_type="text/html"), "Content-Type 'text/html'"),
        (Reply(200, b"\x89PNG...", content_type="image/png"), "Content-Type 'image/png'"),
        (Reply(200, [1, 2]), "expected a JSON object"),
        (Reply(200, {"images": []}), "prediction_time_ms"),
        (Reply(200, {"prediction_time_ms": 1.0}), "'images' list"),
        (
            Reply(200, {"images": [{"image_b64": "x", "seed": 1}], "prediction_time_ms": 1}),
            "removed_for_safety",
        ),
        (
            Reply(
                200,
                {
                    "images": [{"image_b64": "x", "removed_for_safety": False}],
                    "prediction_time_ms": 1,
                },
            ),
            "'seed'",
        ),
        (
            Reply(
                200,
                {
                    "images": [{"image_b64": None, "seed": 1, "removed_for_safety": False}],
                    "prediction_time_ms": 1,
                },
            ),
            "not marked removed_for_safety",
        ),
        (
            Reply(
                200,
                {
                    "images": [{"image_b64": "x", "seed": "abc", "removed_for_safety": False}],
                    "prediction_time_ms": 1,
                },
            ),
            "malformed",
        ),
    ],
)
def test_corrupt_answers_raise_response_format_error(
    server: ScriptedServer, client: OctoAIClient, reply: Reply, needle: str
) -> None:
    server.script(reply)
    with pytest.raises(errors.ResponseFormatError, match="body starts") as info:
        client.generate({"prompt": "a fox"})
    assert needle in str(info.value)
    assert len(server.requests) == 1  # not retried: the generation may have been paid for


def test_html_error_page_is_summarised(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(
        Reply(502, HTML, content_type="text/html"), Reply(404, HTML, content_type="text/html")
    )
    with pytest.raises(errors.NotFoundError, match="502 Bad Gateway"):
        client.generate({"prompt": "a fox"})


def test_excerpts_are_short(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(Reply(200, "x" * 10_000, content_type="application/json"))
    with pytest.raises(errors.ResponseFormatError) as info:
        client.generate({"prompt": "a fox"})
    assert len(str(info.value)) < 400


# ---- async jobs --------------------------------------------------------------------------


def job_reply(server: ScriptedServer, rid: str = "job-1", status: int = 201) -> Reply:
    return Reply(status, {"response_id": rid, "poll_url": f"{server.url}/v1/requests/{rid}"})


def poll_reply(status: str, url: str | None = None) -> Reply:
    body: dict[str, Any] = {"status": status}
    if url:
        body["response_url"] = url
    return Reply(200, body)


@pytest.mark.parametrize("status", [200, 201, 202])
def test_submit_sends_the_async_header(
    server: ScriptedServer, client: OctoAIClient, status: int
) -> None:
    server.script(job_reply(server, status=status))
    job = client.submit({"prompt": "a fox", "seed": 3}, engine="sd")
    (sent,) = server.requests
    assert sent.path == "/generate/sd"
    assert sent.headers["x-octoai-async"] == "1"
    assert sent.json() == {"prompt": "a fox", "seed": 3}
    assert isinstance(job, AsyncJob)
    assert job.response_id == "job-1"
    assert job.poll_url == f"{server.url}/v1/requests/job-1"
    assert job.request.engine is Engine.SD


def test_submit_refuses_bodies_over_10_mb(server: ScriptedServer, client: OctoAIClient) -> None:
    # A PNG signature is enough for the client's image check; 3 x 3 MB -> > 12 MB of base64.
    blob = b"\x89PNG\r\n\x1a\n" + os.urandom(3 * 1024 * 1024)
    request = {"prompt": "merge", "transfer_images": {"sks": [blob, blob, blob]}}
    with pytest.raises(errors.RequestValidationError, match="10 MB"):
        client.submit(request)
    assert server.requests == []


def test_submit_answer_must_name_the_job(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(Reply(201, {"poll_url": "http://x/y"}), Reply(201, {"response_id": "r"}))
    with pytest.raises(errors.ResponseFormatError, match="response_id"):
        client.submit({"prompt": "a fox"})
    with pytest.raises(errors.ResponseFormatError, match="poll_url"):
        client.submit({"prompt": "a fox"})


def test_poll_and_fetch_follow_absolute_urls_to_a_trusted_host(server: ScriptedServer) -> None:
    with (
        scripted_server() as other,
        OctoAIClient(
            TOKEN, base_url=server.url, retry=FAST, timeout=10, trusted_origins=[other.url]
        ) as client,
    ):
        other.script(
            poll_reply("completed", f"{other.url}/v1/responses/job-9"),
            ok([11]),
            poll_reply("completed", f"{other.url}/v1/responses/job-9"),
            ok([11]),
        )
        job = AsyncJob(
            response_id="job-9",
            poll_url=f"{other.url}/v1/requests/job-9",
            request=ImageGenerationRequest(prompt="a fox"),
        )
        result = client.poll(job)
        assert result.status is JobStatus.COMPLETED
        assert result.raw_status == "completed"
        assert client.fetch(result.response_url or "").seeds == [11]
        fetched = client.fetch(job)  # polls once for the response_url
        assert fetched.call_info.response_id == "job-9"
        assert other.paths() == [
            "GET /v1/requests/job-9",
            "GET /v1/responses/job-9",
            "GET /v1/requests/job-9",
            "GET /v1/responses/job-9",
        ]
        assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in other.requests)


def test_relative_poll_url_is_joined_to_the_base(
    server: ScriptedServer, client: OctoAIClient
) -> None:
    server.script(Reply(201, {"response_id": "r1", "poll_url": "/v1/requests/r1"}))
    job = client.submit({"prompt": "a fox"})
    assert job.poll_url == f"{server.url}/v1/requests/r1"


def test_wait_polls_with_backoff_then_fetches(
    server: ScriptedServer, client: OctoAIClient, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(
        job_reply(server),
        poll_reply("pending"),
        poll_reply("running"),
        Reply(503, {"message": "blip"}),  # a poll is retried like any call
        poll_reply("completed", f"{server.url}/v1/responses/job-1"),
        ok([21, 22]),
    )
    job = client.submit({"prompt": "a fox", "num_images": 2})
    response = client.wait(job, timeout=20, poll_interval_s=0.05, max_poll_interval_s=0.2)
    assert response.seeds == [21, 22]
    assert response.call_info.response_id == "job-1"
    assert server.paths()[-1] == "GET /v1/responses/job-1"
    polls = [r.at for r in server.requests if r.path == "/v1/requests/job-1"]
    assert len(polls) == 4
    # The first gap is poll_interval_s, the second is doubled.
    assert polls[2] - polls[1] >= 0.09


def test_wait_failed_status_raises_at_once(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(job_reply(server), poll_reply("failed"))
    job = client.submit({"prompt": "a fox"})
    with pytest.raises(errors.JobFailedError, match="resubmit") as info:
        client.wait(job, timeout=20, poll_interval_s=0.05)
    assert info.value.response_id == "job-1"
    assert len(server.requests) == 2


def test_wait_expired_job_raises_at_once(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(job_reply(server), Reply(404, {"detail": "Not Found"}))
    job = client.submit({"prompt": "a fox"})
    with pytest.raises(errors.JobExpiredError, match="24 hours") as info:
        client.wait(job, timeout=20, poll_interval_s=0.05)
    assert info.value.response_id == "job-1"
    assert info.value.status_code == 404
    assert len(server.requests) == 2


def test_wait_unknown_status_stops_at_the_timeout(
    server: ScriptedServer, client: OctoAIClient, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(job_reply(server))
    server.default = poll_reply("QUEUED_SOMEWHERE")
    job = client.submit({"prompt": "a fox"})
    with pytest.raises(errors.DeadlineExceededError, match="QUEUED_SOMEWHERE"):
        client.wait(job, timeout=0.6, poll_interval_s=0.05, max_poll_interval_s=0.1)
    polls = len(server.requests) - 1
    assert 2 <= polls <= 20
    assert any("unknown status" in r.getMessage() for r in caplog.records)


def test_wait_completed_without_response_url(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(job_reply(server), poll_reply("completed"))
    job = client.submit({"prompt": "a fox"})
    with pytest.raises(errors.OctoAIError, match="no response_url"):
        client.wait(job, timeout=5)


def test_fetch_of_a_pending_job_says_so(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(job_reply(server), poll_reply("running"))
    job = client.submit({"prompt": "a fox"})
    with pytest.raises(errors.JobNotReadyError, match="'running', not completed"):
        client.fetch(job)


def test_fetch_of_an_expired_result(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(Reply(404, {"detail": "gone"}))
    with pytest.raises(errors.JobExpiredError):
        client.fetch(f"{server.url}/v1/responses/old")


def test_poll_answer_needs_a_status(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(Reply(200, {"state": "done"}))
    with pytest.raises(errors.ResponseFormatError, match="status"):
        client.poll(f"{server.url}/v1/requests/x")


# ---- health ------------------------------------------------------------------------------


def test_health(server: ScriptedServer, client: OctoAIClient) -> None:
    server.script(Reply(200, {"status": "ok"}), Reply(503, "down"))
    assert client.health() is True
    assert client.health() is False
    assert server.paths() == ["GET /healthcheck", "GET /healthcheck"]
    with OctoAIClient(TOKEN, base_url=f"http://127.0.0.1:{free_port()}") as dead:
        assert dead.health() is False


# ---- batches -----------------------------------------------------------------------------


def slow_ok(delay: float = 0.15) -> Any:
    def reply(request: Recorded) -> Reply:
        return Reply(200, generation_body([request.json()["seed"]]), delay_s=delay)

    return reply


def test_generate_many_keeps_order_and_the_bound(server: ScriptedServer) -> None:
    server.default = slow_ok()
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, max_concurrency=2) as client:
        responses = client.generate_many([{"prompt": "fox", "seed": s} for s in range(8)])
    assert [r.seeds[0] for r in responses] == list(range(8))
    assert server.max_in_flight == 2


def test_per_call_concurrency_is_capped_by_the_client(server: ScriptedServer) -> None:
    server.default = slow_ok(0.1)
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, max_concurrency=2) as client:
        client.generate_many([{"prompt": "fox", "seed": s} for s in range(6)], max_concurrency=5)
        assert server.max_in_flight == 2
        server.reset()
        server.default = slow_ok(0.1)
        client.generate_many([{"prompt": "fox", "seed": s} for s in range(4)], max_concurrency=1)
        assert server.max_in_flight == 1


def test_the_bound_holds_across_threads(server: ScriptedServer) -> None:
    server.default = slow_ok(0.1)
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, max_concurrency=2) as client:
        threads = [
            threading.Thread(
                target=client.generate_many,
                args=([{"prompt": "fox", "seed": s} for s in range(4)],),
            )
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert len(server.requests) == 12
    assert server.max_in_flight == 2


def test_iter_generate_streams_lazily(server: ScriptedServer) -> None:
    server.default = slow_ok(0.05)
    pulled = 0

    def requests() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        for seed in range(50):
            pulled += 1
            yield {"prompt": "fox", "seed": seed}

    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, max_concurrency=3) as client:
        stream = client.iter_generate(requests())
        index, response = next(stream)
        assert response.seeds == [index]
        assert pulled == 3  # only what is in flight was pulled
        seen = {index} | {i for i, _ in stream}
    assert seen == set(range(50))
    assert server.max_in_flight <= 3


def test_batch_error_is_raised_after_in_flight_work(server: ScriptedServer) -> None:
    def reply(request: Recorded) -> Reply:
        seed = request.json()["seed"]
        if seed == 1:
            return Reply(400, POLICY)
        return Reply(200, generation_body([seed]), delay_s=0.2)

    server.default = reply
    with OctoAIClient(TOKEN, base_url=server.url, retry=FAST, max_concurrency=2) as client:
        with pytest.raises(errors.PolicyViolationError):
            client.generate_many([{"prompt": "fox", "seed": s} for s in range(10)])
        # Seed 0 was in flight and finished; nothing new started after the error.
        assert sorted(r.json()["seed"] for r in server.requests) == [0, 1]

        server.reset()
        server.default = reply
        results = client.generate_many(
            [{"prompt": "fox", "seed": s} for s in range(4)], return_exceptions=True
        )
    assert isinstance(results[1], errors.PolicyViolationError)
    assert [r.seeds for r in results if not isinstance(r, Exception)] == [[0], [2], [3]]


def test_batch_validation_errors_name_the_field(
    server: ScriptedServer, client: OctoAIClient
) -> None:
    server.default = ok()
    results = client.generate_many(
        [{"prompt": "fox"}, {"prompt": "fox", "steps": -1}], return_exceptions=True
    )
    assert isinstance(results[1], errors.RequestValidationError)
    assert "steps" in str(results[1])
    assert len(server.requests) == 1


def test_bring_your_own_http_client(server: ScriptedServer) -> None:
    server.script(ok())
    with httpx.Client() as http:
        client = OctoAIClient(TOKEN, base_url=server.url, http_client=http)
        client.generate({"prompt": "fox"})
        client.close()
        assert not http.is_closed  # the caller's client is the caller's to close
    assert server.requests[0].headers["user-agent"] == f"dagster-octoai/{__version__}"


@pytest.mark.parametrize("module", [client_module, _retry])
def test_docstring_examples_run(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---- against the local OctoAI-compatible server ------------------------------------------

LOCAL_TOKEN = "test-token-0c7f3e9a"  # the plugin's octoai_server token
ENGINE_CASES = [
    ("sdxl", {}, (1024, 1024)),
    ("sd", {}, (512, 512)),
    ("controlnet-sdxl", {"controlnet": "octoai:canny_sdxl"}, (1024, 1024)),
    ("controlnet-sd15", {"controlnet": "octoai:canny_sd15"}, (512, 512)),
]


def local_client(server: Any, **kwargs: Any) -> OctoAIClient:
    kwargs.setdefault("retry", FAST)
    return OctoAIClient(LOCAL_TOKEN, base_url=server.url, **kwargs)


@pytest.mark.parametrize(("engine", "extra", "size"), ENGINE_CASES)
def test_local_server_generate_each_engine(
    octoai_server: Any, engine: str, extra: dict[str, Any], size: tuple[int, int]
) -> None:
    if "controlnet" in extra:
        extra = {**extra, "controlnet_image": jpeg_bytes((64, 64))}
    request = {"prompt": "a red fox", "seed": [11, 12], "num_images": 2, **extra}
    with local_client(octoai_server) as client:
        response = client.generate(request, engine=engine)
        again = client.generate(request, engine=engine)
    assert response.seeds == [11, 12]
    assert [im.size for im in response.images] == [size, size]
    assert [im.data for im in response.images] == [im.data for im in again.images]
    assert response.images[0].data != response.images[1].data
    (request_id,) = response.call_info.request_ids
    logged = {r["request_id"]: r for r in octoai_server.requests(50)}
    assert logged[request_id]["path"] == f"/generate/{engine}"
    assert logged[request_id]["seeds"] == [11, 12]


def test_local_server_errors(octoai_server: Any) -> None:
    with local_client(octoai_server) as client:
        with pytest.raises(errors.PolicyViolationError):
            client.generate({"prompt": "something forbidden"})
        blocked = client.generate({"prompt": "an nsfw fox", "seed": 3})
        assert blocked.removed_count == 1 and not blocked.images[0].available
    with OctoAIClient("wrong-token", base_url=octoai_server.url) as client:
        with pytest.raises(errors.AuthenticationError) as info:
            client.generate({"prompt": "a fox"})
        assert "wrong-token" not in str(info.value)
        assert info.value.request_id


def test_local_server_batch_never_exceeds_replicas(octoai_server_factory: Any) -> None:
    server = octoai_server_factory(latency_per_image_s=0.1, replicas=2)
    requests = [{"prompt": "fox", "engine": "sd", "seed": s} for s in range(8)]
    with local_client(server, max_concurrency=2) as client:
        results = client.generate_many(requests)
    assert [r.seeds for r in results] == [[s] for s in range(8)]
    stats = server.stats()
    assert stats["in_flight_max"] == 2
    assert stats["queued_max"] == 0  # the client never made the server queue
    assert stats["paid_generations"] == 8


def test_local_server_faults_are_retried(octoai_server_factory: Any) -> None:
    from dagster_octoai.server import FaultConfig

    faults = FaultConfig(error_500=0.2, error_503=0.2, drop_connection=0.2, seed=3)
    server = octoai_server_factory(faults=faults, replicas=4)
    requests = [{"prompt": "fox", "engine": "sd", "seed": s} for s in range(12)]
    # 60 % of attempts meet a fault, in an order the threads decide: 10 attempts left one
    # of 12 requests failing every time in about 7 % of runs (0.6 ** 10 each); 30 do not.
    policy = HTTPRetryPolicy(max_attempts=30, initial_backoff_s=0.01, max_backoff_s=0.05)
    with local_client(server, retry=policy) as client:
        results = client.generate_many(requests)
    assert [r.seeds for r in results] == [[s] for s in range(12)]
    stats = server.stats()
    assert sum(stats["faults"].values()) > 0
    assert sum(r.call_info.retries for r in results) == sum(stats["faults"].values())
    assert stats["paid_generations"] == 12  # these faults happen before rendering


def test_local_server_rate_limit_retry_after(octoai_server_factory: Any) -> None:
    server = octoai_server_factory(rate_limit_requests=1, rate_limit_window_s=1.0)
    with local_client(server) as client:
        first = client.generate({"prompt": "fox", "engine": "sd", "seed": 1})
        second = client.generate({"prompt": "fox", "engine": "sd", "seed": 2})
    assert first.call_info.attempts == 1
    assert second.call_info.attempts >= 2
    assert server.stats()["rate_limited"] >= 1


def test_local_server_retrying_a_lost_answer_pays_once(octoai_server_factory: Any) -> None:
    # An answer lost after rendering, every time: each retry carries the call's
    # Idempotency-Key, so the server answers it with the first result and renders once.
    from dagster_octoai.server import FaultConfig

    server = octoai_server_factory(faults=FaultConfig(drop_after_render=1.0))
    policy = HTTPRetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    with local_client(server, retry=policy) as client, pytest.raises(errors.ConnectionFailedError):
        client.generate({"prompt": "fox", "engine": "sd", "seed": 1})
    stats = server.stats()
    assert stats["faults"] == {"drop_after_render": 3}  # two attempts and the spare one
    assert stats["paid_generations"] == 1


def test_local_server_a_connection_closed_before_its_answer_is_sent_again_once(
    octoai_server_factory: Any,
) -> None:
    # With seed 1 the server drops the first answer after rendering and not the second.
    # No retries allowed: the spare send of a keyed request still collects the answer.
    from dagster_octoai.server import FaultConfig

    server = octoai_server_factory(faults=FaultConfig(drop_after_render=0.5, seed=1))
    with local_client(server, retry=HTTPRetryPolicy(max_attempts=1)) as client:
        result = client.generate({"prompt": "fox", "engine": "sd", "seed": 4, "num_images": 2})
        again = client.generate({"prompt": "fox", "engine": "sd", "seed": 4, "num_images": 2})
    assert result.seeds == [4, 5] and result.call_info.attempts == 2
    assert [i.data for i in result.images] == [i.data for i in again.images]
    stats = server.stats()
    assert stats["faults"] == {"drop_after_render": 1}
    assert stats["paid_generations"] == 4  # 2 images each call, the repeat of the first free


def test_local_server_async_jobs(octoai_server_factory: Any) -> None:
    server = octoai_server_factory(async_queue_delay_s=0.2, result_ttl_s=1.0)
    with local_client(server) as client:
        job = client.submit({"prompt": "fox", "engine": "sd", "seed": [5, 6], "num_images": 2})
        assert job.poll_url.startswith(server.url)
        assert client.poll(job).status in (JobStatus.PENDING, JobStatus.RUNNING)
        waited = client.wait(job, timeout=20, poll_interval_s=0.05)
        fetched = client.fetch(job)
        direct = client.generate({"prompt": "fox", "engine": "sd", "seed": [5, 6], "num_images": 2})
        assert waited.seeds == fetched.seeds == [5, 6]
        assert [i.data for i in waited.images] == [i.data for i in direct.images]
        assert waited.call_info.response_id == job.response_id
        time.sleep(1.5)  # past result_ttl_s
        with pytest.raises(errors.JobExpiredError):
            client.fetch(job)
        with pytest.raises(errors.JobExpiredError):
            client.wait(job, timeout=5)


def test_local_server_failed_job(octoai_server_factory: Any) -> None:
    from dagster_octoai.server import FaultConfig

    faults = FaultConfig(job_failure=1.0, job_failure_after_s=0.1)
    server = octoai_server_factory(faults=faults)
    with local_client(server) as client:
        job = client.submit({"prompt": "fox", "engine": "sd"})
        with pytest.raises(errors.JobFailedError) as info:
            client.wait(job, timeout=20, poll_interval_s=0.05)
    assert info.value.response_id == job.response_id


def test_local_server_health(octoai_server: Any) -> None:
    with local_client(octoai_server) as client:
        assert client.health() is True


# ---- conformance with the official octoai 1.11.0 SDK -------------------------------------

CONFORMANCE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("sdxl", {"prompt": "a lighthouse at dusk", "seed": 1234}),
    (
        "sdxl",
        {
            "prompt": "a lighthouse at dusk",
            "negative_prompt": "blurry",
            "seed": [7, 2**32 - 1],
            "num_images": 2,
            "steps": 20,
            "cfg_scale": 7.5,
            "sampler": "K_EULER_ANCESTRAL",
            "width": 1344,
            "height": 768,
            "style_preset": "Watercolor",
            "image_encoding": "png",
        },
    ),
    (
        "controlnet-sdxl",
        {"prompt": "a cat", "seed": 99, "controlnet": "octoai:canny_sdxl"},
    ),
]


@pytest.mark.parametrize(("engine", "params"), CONFORMANCE_CASES)
def test_conformance_with_the_official_sdk(
    octoai_server: Any, engine: str, params: dict[str, Any]
) -> None:
    from octoai.client import OctoAI
    from octoai.environment import OctoAIEnvironment

    if engine.startswith("controlnet"):
        params = {**params, "controlnet_image": base64.b64encode(jpeg_bytes((64, 64))).decode()}
    url = octoai_server.url
    env = OctoAIEnvironment(default=url, image_gen=url, text_gen=url)
    sdk = OctoAI(api_key=LOCAL_TOKEN, environment=env, timeout=60)
    sdk_call = {
        "sdxl": sdk.image_gen.generate_sdxl,
        "controlnet-sdxl": sdk.image_gen.generate_controlnet_sdxl,
    }[engine]
    theirs = sdk_call(**params)

    with local_client(octoai_server) as client:
        ours = client.generate(params, engine=engine)

    assert [im.seed for im in theirs.images] == ours.seeds
    assert [base64.b64decode(im.image_b64 or "") for im in theirs.images] == [
        im.data for im in ours.images
    ]
    assert [im.removed_for_safety for im in theirs.images] == [
        im.removed_for_safety for im in ours.images
    ]
    if params.get("image_encoding") == "png":
        assert all(im.format == "png" for im in ours.images)


# ---- the answer carries its request ----------------------------------------------------


def test_every_answer_carries_the_request_that_produced_it(
    server: ScriptedServer, client: OctoAIClient
) -> None:
    server.default = ok([3])
    asked = {"prompt": "a red fox", "seed": 3, "steps": 9}
    built = ImageGenerationRequest.build(asked, engine="sd")

    one = client.generate(asked, engine="sd")
    assert one.request == built and one.response_id is None and one.reused_from is None
    assert all(im.request == built for im in one.images)
    many = client.generate_many([{**asked, "seed": s} for s in (1, 2)], engine="sd")
    assert [r.request.seed for r in many if r.request] == [1, 2]
    streamed = dict(client.iter_generate([{**asked, "seed": s} for s in (4, 5)], engine="sd"))
    assert {i: r.request.seed for i, r in streamed.items() if r.request} == {0: 4, 1: 5}

    rurl = f"{server.url}/v1/responses/job-1"
    server.script(job_reply(server), poll_reply("completed", rurl), ok([3]))
    job = client.submit(built)
    waited = client.wait(job, timeout=10, poll_interval_s=0.01)
    assert waited.request == built and waited.response_id == "job-1"
    assert all(im.response_id == "job-1" and im.request == built for im in waited.images)
    server.script(poll_reply("completed", rurl), ok([3]))
    fetched = client.fetch(job)
    assert fetched.request == built and fetched.response_id == "job-1"
    # A bare response URL says nothing of the request that made it.
    server.script(ok([3]))
    bare = client.fetch(rurl)
    assert bare.request is None and bare.response_id is None
