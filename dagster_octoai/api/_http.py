"""The I/O-free half of the clients: URLs, headers, the retry state of one call,
error mapping and answer parsing. The sync and the async client differ only in
how they send a request and how they sleep; everything else lives here so the
two cannot drift apart.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import ssl
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from ..version import __version__
from ._retry import HTTPRetryPolicy, is_retryable_status, parse_retry_after
from .errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConnectionFailedError,
    DeadlineExceededError,
    JobExpiredError,
    JobUnknownError,
    NotFoundError,
    OctoAIError,
    PermissionDeniedError,
    PolicyViolationError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    UnprocessableEntityError,
)
from .models import AsyncJob, CallInfo, ImageGenerationResponse, JobStatus, PollResult

logger = logging.getLogger("dagster_octoai.api.client")

USER_AGENT = f"dagster-octoai/{__version__}"
REQUEST_ID_HEADER = "X-User-Request-ID"
EXCERPT_CHARS = 200

#: What a call is for: decides how a 404 is read and what the answer must look like.
CallKind = Literal["generate", "submit", "poll", "fetch", "health"]


#: Tokens shorter than this are hidden only where they stand alone (see :class:`Redactor`).
MIN_SUBSTRING_TOKEN_CHARS = 8

_NAMED_ENTITIES = {"&": "amp", "<": "lt", ">": "gt", '"': "quot", "'": "apos"}
_WORD = "A-Za-z0-9"


def _char_forms(char: str) -> list[str]:
    """Regex alternatives for one character of the token, in the forms texts write it in.

    As is; percent-encoded (once or twice, any hex case: URLs, form bodies, a URL in a
    URL); as a JSON or JavaScript ``\\uXXXX`` escape, a Python ``\\xXX`` escape, a
    backslash escape (JSON's ``\\/``, ``\\"``, ``\\\\``); as an HTML character
    reference (decimal, hex, named); ``+`` for a space in a form body.
    """
    forms = [re.escape(char)]
    utf8 = char.encode("utf-8")
    percent = "".join(f"%{b:02x}" for b in utf8)
    forms.append(f"(?i:{re.escape(percent)})")
    forms.append(f"(?i:{re.escape(percent.replace('%', '%25'))})")
    code = ord(char)
    if code <= 0xFFFF:
        forms.append(f"(?i:\\\\u{code:04x})")
    if code <= 0xFF:
        forms.append(f"(?i:\\\\x{code:02x})")
    if not char.isalnum():
        forms.append(re.escape("\\" + char))
    forms.append(f"&\\#0*{code};")
    forms.append(f"(?i:&\\#x0*{code:x};)")
    if char in _NAMED_ENTITIES:
        forms.append(f"&{_NAMED_ENTITIES[char]};")
    if char == " ":
        forms.append("\\+")
    return forms


def _base64_cores(token: str) -> list[str]:
    """The part of the token's base64 that does not depend on its neighbours, per alignment.

    A token inside base64 (an echoed ``Basic`` header, a base64 blob) starts at one of
    three byte alignments; the first and last characters also mix in the bytes around
    it, so only the middle is searched for.
    """
    raw = token.encode("utf-8")
    cores = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode("ascii").rstrip("=")
        core = encoded[-(-shift * 4 // 3) + 1 : -3]
        if len(core) >= MIN_SUBSTRING_TOKEN_CHARS:
            cores.append(core)
    return cores


class _Hidden:
    """Holds the redactor's pattern (the token, spelled out in alternatives): no repr shows it."""

    __slots__ = ("value",)

    def __init__(self, value: re.Pattern[str]) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<hidden>"


class Redactor:
    """Removes the token from any text that might echo it (error bodies, exception text).

    The token is found in every form a layer between the client and a log could give
    it, mixed character by character: percent-encoded (once or twice), JSON-, Python- or
    backslash-escaped (``\\/``), as HTML character references, and inside base64.

    A token shorter than :data:`MIN_SUBSTRING_TOKEN_CHARS` characters is replaced only
    where it stands alone, not inside a longer word: with the token ``t``, the text
    ``POST /generate/sd`` stays as it is, while ``Bearer t`` becomes ``Bearer ***``.
    Such a token cannot be told from ordinary text; give a real one.

    Holds the token as a ``SecretStr`` and its pattern in a holder whose repr hides it,
    so neither the redactor's repr nor ``vars()`` shows the token.

    Examples:
        >>> Redactor("sk-abc/123456").text("echo: sk-abc%2F123456 and sk-abc\\/123456")
        'echo: *** and ***'
        >>> Redactor("t").text("POST /generate/sd with Bearer t")
        'POST /generate/sd with Bearer ***'
    """

    def __init__(self, token: SecretStr | str | None) -> None:
        secret = token if isinstance(token, SecretStr) else SecretStr(token or "")
        self._token: SecretStr | None = secret if secret.get_secret_value() else None
        self._pattern: _Hidden | None = None
        value = secret.get_secret_value()
        if value:
            body = "".join(f"(?:{'|'.join(_char_forms(c))})" for c in value)
            if len(value) < MIN_SUBSTRING_TOKEN_CHARS:
                body = f"(?<![{_WORD}]){body}(?![{_WORD}])"
            else:
                body = "|".join([body, *(re.escape(c) for c in _base64_cores(value))])
            self._pattern = _Hidden(re.compile(body))

    def __repr__(self) -> str:
        return "Redactor(token=***)"

    def text(self, value: str) -> str:
        """``value`` with every occurrence of the token, in any form, replaced by ``***``."""
        if self._pattern is None:
            return value
        return self._pattern.value.sub("***", value)

    def contains(self, value: str) -> bool:
        """Whether ``value`` holds the token in any form :meth:`text` would remove."""
        return self._pattern is not None and self._pattern.value.search(value) is not None

    def obj(self, value: Any) -> Any:
        """A copy of a parsed JSON value with the token removed from every string."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.obj(v) for v in value]
        if isinstance(value, dict):
            return {self.text(str(k)): self.obj(v) for k, v in value.items()}
        return value


def headers(token: str, *, async_: bool = False, json_body: bool = False) -> dict[str, str]:
    """The headers of a call, complete: a transport sends them as they are."""
    out = {
        "Authorization": f"Bearer {token}",
        "User-Agent": USER_AGENT,
        "Accept": "application/json",
        # What httpx.Client asks for by default; named here so both send paths agree.
        "Accept-Encoding": "gzip, deflate",
    }
    if json_body:
        out["Content-Type"] = "application/json"
    if async_:
        out["X-OctoAI-Async"] = "1"
    return out


def resolve_url(base_url: str, url: str) -> str:
    """An absolute URL is followed as given; a relative one is joined to the base URL."""
    target = httpx.URL(url)
    if target.is_absolute_url:
        return url
    return str(httpx.URL(base_url.rstrip("/") + "/").join(url.lstrip("/")))


@functools.lru_cache(maxsize=1024)
def parsed_url(url: str) -> httpx.URL:
    """``httpx.URL(url)``, cached: a client calls the same few generate URLs over and over,
    and parsing one was a tenth of the client's own CPU per call (benchmark P1).
    ``httpx.URL`` is immutable, so one instance can serve every call."""
    return httpx.URL(url)


def _where(method: str, url: str) -> str:
    # Path only: the host is in the client's repr and query strings may carry signatures.
    return f"{method} {parsed_url(url).path}"


def endpoint(url: str) -> str:
    """``host:port`` of ``url`` (the scheme's port when none is written), for error messages.

    Never the user info or the query, which may carry credentials or signatures.

    Examples:
        >>> endpoint("https://image.octoai.run/generate/sdxl")
        'image.octoai.run:443'
        >>> endpoint("http://[::1]:8000/healthcheck")
        '[::1]:8000'
    """
    parsed = parsed_url(url)
    port = parsed.port or {"https": 443, "http": 80}.get(parsed.scheme)
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{host}:{port}" if port else host


def tls_context() -> ssl.SSLContext:
    """httpx's default certificate verification, built once per CA setting and shared.

    Building a context loads the whole CA bundle (about 50 ms of CPU here), and a new
    ``httpx`` client builds one unless it is given one: every client of the process (one
    per Dagster run, per sensor tick) shares this one instead. ``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR`` are honoured as httpx honours them; changing them gives a new context.
    """
    return _tls_context(os.environ.get("SSL_CERT_FILE", ""), os.environ.get("SSL_CERT_DIR", ""))


@functools.lru_cache(maxsize=8)
def _tls_context(cert_file: str, cert_dir: str) -> ssl.SSLContext:
    # The arguments only key the cache: httpx reads the same variables itself.
    return httpx.create_ssl_context()


def proxy_configured() -> bool:
    """Whether the environment names a proxy (``HTTPS_PROXY``, ``ALL_PROXY``, ...).

    ``NO_PROXY`` alone does not count: it only exempts hosts.
    """
    return any(scheme != "no" for scheme in urllib.request.getproxies())


def direct_request(
    call: Call, content: bytes | None, hdrs: httpx.Headers, timeout: httpx.Timeout
) -> httpx.Request:
    """The request of one attempt, ready for a transport: what ``httpx.Client`` would
    build, without merging URLs, cookies and default headers the call already has."""
    return httpx.Request(
        call.method,
        parsed_url(call.url),
        headers=hdrs,
        content=content,
        extensions={"timeout": timeout.as_dict()},
    )


def clip_timeout(timeout: httpx.Timeout, remaining: float | None) -> tuple[httpx.Timeout, bool]:
    """The attempt's timeout cut to what is left of the deadline, and whether it was cut."""
    if remaining is None:
        return timeout, False
    parts = {
        "connect": timeout.connect,
        "read": timeout.read,
        "write": timeout.write,
        "pool": timeout.pool,
    }
    clipped = False
    for key, value in parts.items():
        if value is None or value > remaining:
            parts[key] = remaining
            clipped = True
    return httpx.Timeout(**parts), clipped


class Call:
    """The retry state of one logical call: attempts, request ids, the deadline.

    The client loop is::

        while True:
            timeout = call.start_attempt()
            try: response = send(timeout)
            except httpx.TransportError as exc: wait = call.on_transport_error(exc)
            else:
                wait = call.on_response(response)
                if wait is None: return response
            sleep(wait)

    ``on_*`` return the wait before the next attempt, or raise the error to surface.
    """

    def __init__(
        self,
        *,
        method: str,
        url: str,
        kind: CallKind,
        policy: HTTPRetryPolicy,
        timeout: httpx.Timeout,
        redactor: Redactor,
        deadline: float | None = None,
        response_id: str | None = None,
        rng: Callable[[int], float] | None = None,
    ) -> None:
        self.method = method
        self.url = url
        self.kind = kind
        self.policy = policy
        self.timeout = timeout
        self.redactor = redactor
        self.response_id = response_id
        self.started = time.monotonic()
        own = None if policy.deadline_s is None else self.started + policy.deadline_s
        self.deadline = (
            own if deadline is None else (deadline if own is None else min(own, deadline))
        )
        self.attempts = 0
        self.request_ids: list[str] = []
        self._clipped = False
        #: Sent with an Idempotency-Key: a repeat costs nothing on a server that honours it.
        self.idempotent = False
        self._spare_used = False
        self._backoff = rng or policy.backoff
        self.where = _where(method, url)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def start_attempt(self) -> httpx.Timeout:
        """Count an attempt and return its timeout; raises when the deadline has passed."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise self.deadline_error()
        self.attempts += 1
        timeout, self._clipped = clip_timeout(self.timeout, remaining)
        logger.debug("%s attempt %d/%d", self.where, self.attempts, self.policy.max_attempts)
        return timeout

    def on_response(self, response: httpx.Response) -> float | None:
        """``None`` for a 2xx answer, else the wait before retrying; raises when done."""
        request_id = response.headers.get(REQUEST_ID_HEADER)
        if request_id and request_id not in self.request_ids:
            self.request_ids.append(request_id)
        if response.is_success:
            return None
        status = response.status_code
        if not is_retryable_status(status):
            raise self.status_error(response)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return self._next_wait(
            lambda note: self.status_error(response, note=note),
            cause=f"status {status}",
            retry_after=retry_after,
        )

    def on_transport_error(self, exc: httpx.TransportError) -> float:
        """The wait before retrying after a failed connection; raises when done.

        The error raised chains to ``exc`` (``__cause__``, which Dagster stores with a
        failed run) only when ``exc``'s text is free of the token in every form; else
        it stands alone, with the token redacted from its own message.
        """
        cause: BaseException | None = None if self.redactor.contains(f"{exc!r} {exc}") else exc
        if isinstance(exc, httpx.TimeoutException) and self._clipped:
            raise self.deadline_error() from cause
        if (
            self.idempotent
            and _closed_before_answer(exc)
            and not self._spare_used
            and self.attempts >= self.policy.max_attempts
        ):
            # A pooled connection the server closed before answering, or an answer lost:
            # the Idempotency-Key makes sending it again safe (the server answers a repeat
            # with the first result, unpaid), so once more even when no retry is left.
            self._spare_used = True
            logger.warning(
                "%s: the connection closed before an answer; sending it again once with "
                "its Idempotency-Key",
                self.where,
            )
            return 0.0
        what = _describe_transport_error(exc, endpoint(self.url))
        if not isinstance(
            exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError
        ):
            # An unsupported scheme or a malformed request: waiting will not fix it.
            raise ConnectionFailedError(
                self.redactor.text(f"{self.where}: {what}"), response_id=self.response_id
            ) from cause
        hint = _connect_hint(exc)

        def build(note: str) -> OctoAIError:
            return ConnectionFailedError(
                self.redactor.text(f"{self.where}: {what}{note}{hint}"),
                request_id=self._last_request_id(),
                response_id=self.response_id,
            )

        return self._next_wait(build, cause=what, retry_after=None, exc=cause)

    def info(self) -> CallInfo:
        return CallInfo(
            attempts=self.attempts,
            request_ids=tuple(self.request_ids),
            elapsed_s=time.monotonic() - self.started,
            response_id=self.response_id,
        )

    def _next_wait(
        self,
        build: Callable[[str], OctoAIError],
        *,
        cause: str,
        retry_after: float | None,
        exc: BaseException | None = None,
    ) -> float:
        policy = self.policy
        if self.attempts >= policy.max_attempts:
            raise build(f" (gave up after {self.attempts} attempts)") from exc
        if retry_after is not None and retry_after > policy.max_retry_after_s:
            raise build(
                f" (Retry-After {retry_after:.0f} s is over max_retry_after_s="
                f"{policy.max_retry_after_s:g}; not retried)"
            ) from exc
        wait = retry_after if retry_after is not None else self._backoff(self.attempts - 1)
        remaining = self.remaining()
        if remaining is not None and wait >= remaining:
            raise build(
                f" (gave up after {self.attempts} attempts: a {wait:.1f} s wait would pass "
                f"the {policy.deadline_s:g} s deadline)"
            ) from exc
        logger.warning(
            "%s failed with %s (attempt %d/%d); retrying in %.2f s%s",
            self.where,
            self.redactor.text(cause),
            self.attempts,
            policy.max_attempts,
            wait,
            " (Retry-After)" if retry_after is not None else "",
        )
        return wait

    def deadline_error(self) -> DeadlineExceededError:
        budget = max(0.0, self.deadline - self.started) if self.deadline is not None else 0.0
        tried = f"after {self.attempts} attempt(s)" if self.attempts else "before the first attempt"
        return DeadlineExceededError(
            f"{self.where}: the {budget:.1f} s deadline ran out {tried}",
            request_id=self._last_request_id(),
            response_id=self.response_id,
        )

    def _last_request_id(self) -> str | None:
        return self.request_ids[-1] if self.request_ids else None

    def status_error(self, response: httpx.Response, *, note: str = "") -> APIStatusError:
        return error_from_response(
            response,
            kind=self.kind,
            where=self.where,
            redactor=self.redactor,
            response_id=self.response_id,
            note=note,
        )


def _closed_before_answer(exc: httpx.TransportError) -> bool:
    """Whether the connection closed before any answer byte (h11's words) or was reset."""
    if isinstance(exc, httpx.RemoteProtocolError):
        return "without sending a response" in str(exc)
    return isinstance(exc, httpx.ReadError | httpx.WriteError)


def _describe_transport_error(exc: httpx.TransportError, where: str) -> str:
    """What failed, with the server's ``host:port`` and, for a failed connect, what to check."""
    kind = {
        httpx.ConnectTimeout: f"connect to {where} timed out",
        httpx.ReadTimeout: f"read from {where} timed out",
        httpx.WriteTimeout: f"write to {where} timed out",
        httpx.PoolTimeout: f"timed out waiting for a pooled connection to {where}",
        httpx.ConnectError: f"could not connect to {where}",
        httpx.RemoteProtocolError: f"connection to {where} dropped",
        httpx.ReadError: f"connection to {where} dropped while reading",
        httpx.WriteError: f"connection to {where} dropped while sending",
    }.get(type(exc), f"{type(exc).__name__} talking to {where}")
    detail = str(exc).strip()
    return f"{kind} ({detail})" if detail else kind


def _connect_hint(exc: httpx.TransportError) -> str:
    """For a connection that never opened, what to check (after the error's own text)."""
    if not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ""
    lowered = str(exc).lower()
    if (
        "name or service not known" in lowered
        or "nodename nor servname" in lowered
        or ("temporary failure in name resolution" in lowered)
    ):
        problem = "the host name does not resolve"
    elif "connection refused" in lowered:
        problem = "nothing is listening there"
    else:
        problem = "the server did not answer"
    return (
        f"; {problem}: check base_url (or OCTOAI_BASE_URL) and that the server is running "
        "(`dagster-octoai serve` starts a local one on 127.0.0.1:8000)"
    )


# ---- errors -------------------------------------------------------------------------


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _body(response: httpx.Response, redactor: Redactor) -> tuple[Any, str]:
    """The parsed (redacted) body and a one-line text for messages."""
    text = redactor.text(response.text)
    try:
        parsed = redactor.obj(json.loads(text)) if text.strip() else None
    except ValueError:
        parsed = None
    if parsed is None:
        title = _TITLE.search(text)
        return text or None, _excerpt(title.group(1) if title else text)
    return parsed, _server_message(parsed)


def _server_message(body: Any) -> str:
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, list):
            return _excerpt("; ".join(_detail_item(d) for d in detail))
        for key in ("message", "detail", "error", "msg"):
            if isinstance(body.get(key), str):
                return _excerpt(body[key])
    return _excerpt(json.dumps(body, ensure_ascii=False))


def _detail_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = [str(p) for p in item.get("loc") or [] if p != "body"]
    msg = str(item.get("msg", ""))
    return f"{'.'.join(loc)}: {msg}" if loc else msg


_HINTS = {
    401: "check the API token (token= or OCTOAI_TOKEN)",
    403: "the token may not use this engine or asset",
    429: "rate limited",
}


def error_from_response(
    response: httpx.Response,
    *,
    kind: CallKind,
    where: str,
    redactor: Redactor,
    response_id: str | None = None,
    note: str = "",
) -> APIStatusError:
    """The typed exception for an error answer; its text and body never hold the token."""
    status = response.status_code
    body, said = _body(response, redactor)
    request_id = response.headers.get(REQUEST_ID_HEADER)
    message = f"{where} answered {status} {response.reason_phrase}".rstrip()
    if said:
        message += f": {said}"
    hint = _HINTS.get(status)
    kwargs: dict[str, Any] = {
        "status_code": status,
        "body": body,
        "request_id": request_id,
        "response_id": response_id,
    }
    cls: type[APIStatusError]
    if status == 400:
        cls = PolicyViolationError if "acceptable use policy" in said.lower() else BadRequestError
    elif status == 401:
        cls = AuthenticationError
    elif status == 403:
        cls = PermissionDeniedError
    elif status == 404 and kind in ("poll", "fetch"):
        # This package's server says which ("reason"); a server that does not is read as
        # OctoAI's: a result past its 24 hours.
        if isinstance(body, dict) and body.get("reason") == "unknown":
            cls = JobUnknownError
            hint = "the server does not know this id (or it is another token's)"
        else:
            cls = JobExpiredError
            hint = "async results are kept 24 hours, then deleted; resubmit the request"
    elif status == 404:
        cls = NotFoundError
        hint = "unknown engine, or the base_url is not an OctoAI image server"
    elif status == 422:
        cls = UnprocessableEntityError
    elif status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            hint = f"rate limited; the server asks to wait {retry_after:g} s"
        message = redactor.text(message + (f" ({hint})" if hint else "") + note)
        return RateLimitError(message, retry_after=retry_after, **kwargs)
    elif status >= 500:
        cls = ServerError
    else:
        cls = APIStatusError
    if hint:
        message += f" ({hint})"
    return cls(redactor.text(message + note), **kwargs)


# ---- answers ------------------------------------------------------------------------


def _format_error(
    response: httpx.Response, where: str, problem: str, redactor: Redactor, response_id: str | None
) -> ResponseFormatError:
    excerpt = _excerpt(redactor.text(response.text))
    return ResponseFormatError(
        f"{where}: {problem}; body starts: {excerpt!r}",
        status_code=response.status_code,
        request_id=response.headers.get(REQUEST_ID_HEADER),
        response_id=response_id,
    )


def json_object(
    response: httpx.Response, where: str, redactor: Redactor, response_id: str | None = None
) -> dict[str, Any]:
    """The answer's JSON object, or :class:`ResponseFormatError` with an excerpt."""
    ctype = response.headers.get("Content-Type", "")
    if "json" not in ctype.lower():
        raise _format_error(
            response,
            where,
            f"expected a JSON answer, got Content-Type {ctype or 'none'!r}",
            redactor,
            response_id,
        )
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise _format_error(
            response, where, f"the answer is not valid JSON ({exc})", redactor, response_id
        ) from None
    if not isinstance(body, dict):
        raise _format_error(
            response,
            where,
            f"expected a JSON object, got {type(body).__name__}",
            redactor,
            response_id,
        )
    return body


def parse_generation(
    response: httpx.Response, where: str, redactor: Redactor, response_id: str | None = None
) -> ImageGenerationResponse:
    """An image generation body, held to what the official SDK requires of it."""
    fast = _fast_generation(response)
    if fast is not None:
        return fast
    # The slow path parses again only to name what is wrong with a bad answer.
    return parse_answer(
        response, where, redactor, response_id, ImageGenerationResponse, "images", "image_b64"
    )


AnswerT = TypeVar("AnswerT", bound=BaseModel)


def parse_answer(
    response: httpx.Response,
    where: str,
    redactor: Redactor,
    response_id: str | None,
    model: type[AnswerT],
    items: str,
    payload: str,
) -> AnswerT:
    """A generation answer (``items``: its list, e.g. ``images`` or ``videos``; ``payload``:
    each item's base64 field), held to what OctoAI's API requires of it, each problem named.
    """
    body = json_object(response, where, redactor, response_id)

    def bad(problem: str) -> ResponseFormatError:
        return _format_error(response, where, problem, redactor, response_id)

    if "prediction_time_ms" not in body:
        raise bad("the generation answer lacks 'prediction_time_ms'")
    listed = body.get(items)
    if not isinstance(listed, list):
        raise bad(f"the generation answer lacks an {items!r} list")
    for i, item in enumerate(listed):
        if not isinstance(item, dict):
            raise bad(f"{items}[{i}] is not an object")
        for key in ("seed", "removed_for_safety"):
            if key not in item:
                raise bad(f"{items}[{i}] lacks {key!r}")
        if item.get(payload) is None and item.get("removed_for_safety") is not True:
            raise bad(f"{items}[{i}] has no {payload} but is not marked removed_for_safety")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise bad(f"the generation answer is malformed ({problems})") from None


def _fast_generation(response: httpx.Response) -> ImageGenerationResponse | None:
    """The answer parsed straight from the bytes by pydantic, or ``None`` when it is not
    a well-formed generation body (the caller then finds and names the problem).

    ``model_validate_json`` on the raw bytes is about three times as fast as
    ``json.loads`` followed by ``model_validate`` (benchmark P1); the checks below are
    the same ones :func:`parse_generation` makes on the parsed dict.
    """
    if "json" not in response.headers.get("Content-Type", "").lower():
        return None
    try:
        result = ImageGenerationResponse.model_validate_json(response.content)
    except ValidationError:
        return None
    if "prediction_time_ms" not in result.model_fields_set:
        return None
    for image in result.images:
        if "removed_for_safety" not in image.model_fields_set:
            return None
        if image.image_b64 is None and image.removed_for_safety is not True:
            return None
    return result


def parse_job_ids(
    response: httpx.Response, where: str, redactor: Redactor, base_url: str
) -> tuple[str, str]:
    """An async submission's answer: its ``response_id`` and ``poll_url`` (resolved)."""
    body = json_object(response, where, redactor)
    response_id, poll_url = body.get("response_id"), body.get("poll_url")
    if not isinstance(response_id, str) or not response_id:
        raise _format_error(response, where, "the async answer lacks 'response_id'", redactor, None)
    if not isinstance(poll_url, str) or not poll_url:
        raise _format_error(
            response, where, "the async answer lacks 'poll_url'", redactor, response_id
        )
    return response_id, resolve_url(base_url, poll_url)


def parse_job(
    response: httpx.Response,
    where: str,
    redactor: Redactor,
    request: Any,
    base_url: str,
) -> AsyncJob:
    response_id, poll_url = parse_job_ids(response, where, redactor, base_url)
    return AsyncJob(response_id=response_id, poll_url=poll_url, request=request)


def parse_poll(
    response: httpx.Response, where: str, redactor: Redactor, response_id: str | None
) -> PollResult:
    body = json_object(response, where, redactor, response_id)
    raw = body.get("status")
    if not isinstance(raw, str):
        raise _format_error(
            response, where, "the poll answer lacks 'status'", redactor, response_id
        )
    url = body.get("response_url")
    return PollResult(
        status=JobStatus.parse(raw),
        raw_status=raw,
        response_url=url if isinstance(url, str) and url else None,
    )
