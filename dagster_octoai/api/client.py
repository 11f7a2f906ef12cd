"""HTTP clients for the OctoAI image API: :class:`OctoAIClient` and :class:`AsyncOctoAIClient`.

Imports no Dagster. Each client holds one pooled ``httpx`` client for its
lifetime, validates every request before sending it, retries what is worth
retrying (see :class:`HTTPRetryPolicy`), and raises the typed errors of
:mod:`dagster_octoai.api.errors`. The token never appears in a repr, a log line or
an exception.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Mapping,
)
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait as wait_futures
from types import TracebackType
from typing import Any, Generic, Literal, TypeAlias, TypeVar, overload

import httpx
from pydantic import SecretStr

from ._http import (
    USER_AGENT,
    Call,
    CallKind,
    Redactor,
    direct_request,
    headers,
    parse_generation,
    parse_job,
    parse_poll,
    proxy_configured,
    resolve_url,
    tls_context,
)
from ._retry import HTTPRetryPolicy
from ._wait import AnyJob, _JobWait, _label, _not_ready
from .errors import (
    ConnectionFailedError,
    JobCancelledError,
    JobFailedError,
    OctoAIError,
    RequestValidationError,
    ServerError,
    UntrustedOriginError,
)
from .models import (
    ASYNC_BODY_LIMIT_BYTES,
    AsyncJob,
    Engine,
    ImageGenerationRequest,
    ImageGenerationResponse,
    JobStatus,
    PollResult,
)
from .video import VideoJob
from .video_client import AsyncVideoCalls, VideoCalls

__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "AsyncOctoAIClient",
    "HTTPRetryPolicy",
    "OctoAIClient",
]

logger = logging.getLogger("dagster_octoai.api.client")

#: Where ``dagster-octoai serve`` listens by default. OctoAI's hosted service
#: (``https://image.octoai.run``) has closed, so no remote host is a safe default: unset,
#: the client talks to the local server, and a missing one fails naming this address.
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
#: Read for ``base_url`` when none is passed, as the OpenAI client reads ``OPENAI_BASE_URL``.
BASE_URL_ENV = "OCTOAI_BASE_URL"
#: OctoAI's historical hosted service and the origin that answered its polls and served its
#: results: that origin is trusted with the token only when ``base_url`` is the hosted one.
_HOSTED_BASE_URL = "https://image.octoai.run"
_HOSTED_ASYNC_ORIGIN = "https://async.octoai.run"
TOKEN_ENV = "OCTOAI_TOKEN"
# Connecting should be quick; a stuck connect is retried rather than waited out.
_CONNECT_TIMEOUT_S = 10.0
_HEALTH_TIMEOUT_S = 10.0

HttpT = TypeVar("HttpT", bound=httpx.Client | httpx.AsyncClient)
DirectT = TypeVar("DirectT", bound=httpx.HTTPTransport | httpx.AsyncHTTPTransport)
SlotsT = TypeVar("SlotsT", bound=threading.BoundedSemaphore | asyncio.Semaphore)

RequestLike: TypeAlias = ImageGenerationRequest | Mapping[str, Any]
BatchItem: TypeAlias = ImageGenerationResponse | OctoAIError


def _resolve_token(token: str | None) -> str:
    value = (token if token is not None else os.environ.get(TOKEN_ENV, "")).strip()
    if not value:
        raise RequestValidationError(
            f"token: no API token; pass token=... or set the {TOKEN_ENV} environment variable",
            [{"field": "token", "message": f"missing; pass token=... or set {TOKEN_ENV}"}],
        )
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        # Never echo the value: an HTTP library's own error would show the whole header.
        raise RequestValidationError(
            "token: holds a space, a control character or a non-ASCII character, which a "
            "bearer token cannot (check how it was pasted; no character of it is shown)",
            [{"field": "token", "message": "only printable ASCII without spaces is allowed"}],
        )
    return value


def resolve_base_url(base_url: str | None) -> str:
    """``base_url``, else ``$OCTOAI_BASE_URL``, else :data:`DEFAULT_BASE_URL`; checked.

    Raises:
        RequestValidationError: the URL is not an absolute http(s) URL; the message says
            where it came from.

    Examples:
        >>> resolve_base_url("http://images.internal:8000/")
        'http://images.internal:8000'
    """
    source = "base_url"
    if base_url is None:
        env = os.environ.get(BASE_URL_ENV, "").strip()
        base_url, source = (env, BASE_URL_ENV) if env else (DEFAULT_BASE_URL, "base_url")
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise RequestValidationError(
            f"{source}: {base_url!r} is not an http(s) URL, e.g. {DEFAULT_BASE_URL!r}",
            [{"field": source, "message": "must be an absolute http or https URL"}],
        )
    return base_url.rstrip("/")


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL, the port always written out.

    Examples:
        >>> origin_of("https://Example.com/v1/x?y=1")
        'https://example.com:443'
    """
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme, 0)
    return f"{parsed.scheme}://{parsed.host.lower()}:{port}"


def _check_origins(origins: Iterable[str]) -> frozenset[str]:
    checked = set()
    for value in origins:
        url = httpx.URL(value)
        if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
            raise RequestValidationError(
                f"trusted_origins: {value!r} is not an origin; give scheme, host and "
                "optional port only, e.g. 'https://async.example.com'",
                [
                    {
                        "field": "trusted_origins",
                        "message": "each entry must be scheme://host[:port]",
                    }
                ],
            )
        checked.add(origin_of(value))
    return frozenset(checked)


def _timeout(timeout: float | httpx.Timeout) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout, connect=min(timeout, _CONNECT_TIMEOUT_S))


def _check_concurrency(value: int, name: str = "max_concurrency") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestValidationError(
            f"{name}: {value!r} must be an int >= 1 (the endpoint's replica count)",
            [{"field": name, "message": "must be an int >= 1"}],
        )
    return value


class _ClientBase(Generic[HttpT, DirectT, SlotsT]):
    """What the sync and async clients share: configuration, the connection pool,
    request building, URLs.

    Every call goes to ``self._direct`` (the pool's transport, handed the request
    straight) or, when that is ``None``, through the whole ``self._http`` client:
    see :meth:`_open`.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float | httpx.Timeout = 120.0,
        retry: HTTPRetryPolicy | None = None,
        max_concurrency: int = 4,
        http_client: HttpT | None = None,
        trusted_origins: Iterable[str] = (),
    ) -> None:
        # A SecretStr: vars(client), a debugger's locals and any repr show '**********'.
        self._token = SecretStr(_resolve_token(token))
        self._redactor = Redactor(self._token)
        self._base_url = resolve_base_url(base_url)
        self._origin = origin_of(self._base_url)
        defaults = [_HOSTED_ASYNC_ORIGIN] if self._base_url == _HOSTED_BASE_URL else []
        self._trusted = _check_origins([*defaults, *trusted_origins]) | {self._origin}
        self._timeout = _timeout(timeout)
        self._retry = retry if retry is not None else HTTPRetryPolicy()
        self._max_concurrency = _check_concurrency(max_concurrency)
        # Built once: the four header sets a call can need (never mutated after this).
        # httpx.Headers shows an Authorization header as '[secure]' in its repr.
        self._headers = {
            (async_, json_body): httpx.Headers(
                headers(self._token.get_secret_value(), async_=async_, json_body=json_body)
            )
            for async_ in (False, True)
            for json_body in (False, True)
        }
        self._owns_http = http_client is None
        self._direct: DirectT | None
        self._http: HttpT
        self._direct, self._http = self._open(http_client)
        self._slots: SlotsT = self._new_slots()

    def _open(self, http_client: HttpT | None) -> tuple[DirectT | None, HttpT]:
        """The transport calls are handed to directly (or ``None``), and the httpx client.

        A client of our own shares one connection pool with the transport. Handing a
        request to the transport skips the ``httpx.Client`` layers the API never uses
        (URL merging, the cookie jar, auth and redirect handling): about a third of
        the client's CPU per call (benchmark P1). Only ``httpx.Client`` honours proxy
        environment variables, so with a proxy configured, or with a client passed
        in (custom transports, mounts, event hooks), every call goes through it.
        """
        if http_client is not None:
            return None, http_client
        # Room beyond the generation slots for polls, fetches and health checks.
        pool = self._max_concurrency + 4
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        direct: DirectT | None = None
        if not proxy_configured():
            direct = self._transport_type(limits=limits, verify=tls_context())
        http: HttpT = self._http_type(
            timeout=self._timeout,
            limits=limits,
            headers={"User-Agent": USER_AGENT},
            transport=direct,
            verify=tls_context(),
        )
        return direct, http

    # The sync or async flavours of the transport, the client and the generation slots.
    _transport_type: Callable[..., DirectT]
    _http_type: Callable[..., HttpT]

    def _new_slots(self) -> SlotsT:
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        """The server's base URL, without a trailing slash."""
        return self._base_url

    @property
    def max_concurrency(self) -> int:
        """Most sync generations this client has in flight at once (the endpoint's replicas)."""
        return self._max_concurrency

    @property
    def retry(self) -> HTTPRetryPolicy:
        """The retry policy of every HTTP call."""
        return self._retry

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._base_url!r}, token=***)"

    def _batch_width(self, max_concurrency: int | None) -> int:
        if max_concurrency is None:
            return self._max_concurrency
        return min(_check_concurrency(max_concurrency), self._max_concurrency)

    def _generate_url(self, engine: Engine) -> str:
        return f"{self._base_url}/generate/{engine.value}"

    def _call(
        self,
        method: str,
        url: str,
        kind: CallKind,
        *,
        deadline: float | None = None,
        response_id: str | None = None,
        retry: HTTPRetryPolicy | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> Call:
        return Call(
            method=method,
            url=url,
            kind=kind,
            policy=retry or self._retry,
            timeout=timeout or self._timeout,
            redactor=self._redactor,
            deadline=deadline,
            response_id=response_id,
        )

    def _request_headers(
        self, async_: bool, json_body: bool, idempotency_key: str | None
    ) -> httpx.Headers:
        hdrs = self._headers[async_, json_body]
        if idempotency_key is None:
            return hdrs
        if not (1 <= len(idempotency_key) <= 255) or not all(
            "\x21" <= c <= "\x7e" for c in idempotency_key
        ):
            raise RequestValidationError(
                "idempotency_key: expected 1 to 255 printable ASCII characters without "
                f"spaces, got {len(idempotency_key)} characters",
                [{"field": "idempotency_key", "message": "1-255 printable ASCII, no spaces"}],
            )
        hdrs = hdrs.copy()
        hdrs["Idempotency-Key"] = idempotency_key
        return hdrs

    def _submit_body(self, request: ImageGenerationRequest) -> bytes:
        body = request.wire_bytes()
        if len(body) > ASYNC_BODY_LIMIT_BYTES:
            mb = len(body) / 1024 / 1024
            raise RequestValidationError(
                f"request: the JSON body is {mb:.1f} MB, over the 10 MB limit of async "
                "requests; use smaller or JPEG input images, or the sync generate()",
                [{"field": "request", "message": f"body {mb:.1f} MB > 10 MB async limit"}],
            )
        return body

    @property
    def trusted_origins(self) -> frozenset[str]:
        """The origins the token is sent to: ``base_url``'s and those given as trusted."""
        return self._trusted

    def _trusted_url(self, url: str, what: str, response_id: str | None) -> str:
        """``url`` resolved against the base URL, refused if the token may not go there.

        Poll and response URLs come from the server's answers, and the client sends the
        token to them: a server (or anything that can change its answers) could
        otherwise name a host of its choosing and receive the token.
        """
        resolved = resolve_url(self._base_url, url)
        origin = origin_of(resolved)
        if origin not in self._trusted:
            raise UntrustedOriginError(
                f"the {what}{_label(response_id)} points at {origin}, not at base_url's origin "
                f"{self._origin}; the token was not sent there. If that host is yours, add "
                f"it to trusted_origins (e.g. trusted_origins=[{origin!r}])",
                origin=origin,
                response_id=response_id,
            )
        return resolved

    def _poll_target(self, job: AnyJob | str) -> tuple[str, str | None]:
        if isinstance(job, (AsyncJob, VideoJob)):
            url = self._trusted_url(job.poll_url, "poll_url of async job", job.response_id)
            return url, job.response_id
        return self._trusted_url(job, "poll_url", None), None

    def _completed_url(self, result: PollResult, response_id: str | None) -> str | None:
        """The response URL of a finished job; raises for a failed one; None while running."""
        if result.status is JobStatus.CANCELLED:
            raise JobCancelledError(
                f"async job{_label(response_id)} was cancelled; resubmit it to run it again",
                response_id=response_id,
            )
        if result.status is JobStatus.FAILED:
            raise JobFailedError(
                f"async job{_label(response_id)} ended with status {result.raw_status!r}; "
                "resubmit it with the same parameters",
                response_id=response_id,
            )
        if result.status is not JobStatus.COMPLETED:
            return None
        if result.response_url is None:
            raise OctoAIError(
                f"async job{_label(response_id)} is completed but the poll answer has no "
                "response_url",
                response_id=response_id,
            )
        return self._trusted_url(result.response_url, "response_url of async job", response_id)

    def _log_done(self, what: str, result: ImageGenerationResponse) -> None:
        call = result.call_info
        logger.info(
            "%s: %d image(s), %d removed for safety, %.0f ms prediction, %d attempt(s), %.2f s",
            what,
            len(result.images),
            result.removed_count,
            result.prediction_time_ms,
            call.attempts,
            call.elapsed_s,
        )


def _build(request: RequestLike, engine: Engine | str | None) -> ImageGenerationRequest:
    """The validated request; a built one for the same engine is not validated again."""
    if isinstance(request, ImageGenerationRequest) and (
        engine is None or request.engine.value == engine or request.engine is engine
    ):
        return request
    return ImageGenerationRequest.build(request, engine=engine)


def _job_answer(
    answer: ImageGenerationResponse, job: AsyncJob | None, call: Call
) -> ImageGenerationResponse:
    """An async result carrying its job's request and response id (none for a bare URL)."""
    if job is None:
        return answer._attach(None, call=call.info())
    return answer._attach(job.request, response_id=job.response_id, call=call.info())


class OctoAIClient(
    VideoCalls, _ClientBase[httpx.Client, httpx.HTTPTransport, threading.BoundedSemaphore]
):
    """A thread-safe client of the OctoAI image API.

    One pooled connection pool serves the client's lifetime; close it with
    :meth:`close` or use the client as a context manager. At most
    ``max_concurrency`` sync generations are in flight at once, across all threads
    and batches: set it to the endpoint's replica count.

    Args:
        token: API token; defaults to the ``OCTOAI_TOKEN`` environment variable.
        base_url: The server, e.g. a self-hosted OctoAI-compatible one; defaults to the
            ``OCTOAI_BASE_URL`` environment variable, else ``http://127.0.0.1:8000`` (the
            local server's default address).
        timeout: Per-attempt timeout in seconds (connect is capped at 10 s), or an
            ``httpx.Timeout``.
        retry: How calls are retried; see :class:`HTTPRetryPolicy`.
        max_concurrency: Most generations in flight at once.
        http_client: An ``httpx.Client`` to use instead of the client's own (it is
            not closed by :meth:`close`).
        trusted_origins: Origins (``scheme://host[:port]``) besides ``base_url``'s that
            the server's ``poll_url`` / ``response_url`` may point at; the token is sent
            to no other. With ``base_url`` OctoAI's historical ``https://image.octoai.run``,
            its async host (``https://async.octoai.run``) is trusted too.

    Examples:
        >>> with OctoAIClient("my-token", base_url="http://127.0.0.1:9") as client:
        ...     client
        OctoAIClient(base_url='http://127.0.0.1:9', token=***)

        Against a live server::

            with OctoAIClient(base_url="https://image.example.com") as client:
                response = client.generate({"prompt": "a red fox", "seed": 7}, engine="sdxl")
                Path("fox.jpg").write_bytes(response.images[0].data)
    """

    _transport_type = httpx.HTTPTransport
    _http_type = httpx.Client

    def _new_slots(self) -> threading.BoundedSemaphore:
        return threading.BoundedSemaphore(self._max_concurrency)

    # ---- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (not an ``http_client`` that was passed in)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> OctoAIClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- transport -------------------------------------------------------------------

    def _send(
        self,
        call: Call,
        *,
        content: bytes | None = None,
        async_: bool = False,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        if content is not None and idempotency_key is None:
            # One key per logical call: its retries are repeats the server answers once.
            idempotency_key = secrets.token_urlsafe(18)
        call.idempotent = idempotency_key is not None
        hdrs = self._request_headers(async_, content is not None, idempotency_key)
        while True:
            timeout = call.start_attempt()
            failure: httpx.TransportError | None = None
            try:
                with self._slot(call):
                    if self._direct is None:
                        response = self._http.request(
                            call.method, call.url, content=content, headers=hdrs, timeout=timeout
                        )
                    else:
                        request = direct_request(call, content, hdrs, timeout)
                        response = self._direct.handle_request(request)
                        response.request = request
                        try:
                            response.read()
                        finally:
                            response.close()
            except httpx.TransportError as exc:
                # Handled outside the except block: an error raised for it then chains to
                # it only where on_transport_error chooses (never when it holds the token).
                failure = exc
            if failure is not None:
                wait = call.on_transport_error(failure)
            else:
                retry_wait = call.on_response(response)
                if retry_wait is None:
                    return response
                wait = retry_wait
            time.sleep(wait)

    def _slot(self, call: Call) -> _Slot:
        return _Slot(self._slots if call.kind == "generate" else None, call)

    # ---- sync generation -------------------------------------------------------------

    def generate(
        self,
        request: RequestLike,
        *,
        engine: Engine | str | None = None,
        idempotency_key: str | None = None,
    ) -> ImageGenerationResponse:
        """Generate images and wait for them (``POST /generate/{engine}``).

        Args:
            request: An :class:`ImageGenerationRequest` or a dict with its keys.
            engine: Overrides the request's engine (default ``sdxl``).
            idempotency_key: The ``Idempotency-Key`` header; one is made for each call
                when none is given. A server that honours it (this package's does)
                answers a repeat with the first answer, unpaid: a request whose
                connection closed before its answer is sent again once, even with no
                retries left.

        Returns:
            The answer: its ``request`` is the validated request sent, ``call_info``
            holds attempts, request ids and elapsed time. Return it from an asset whose
            output an image IO manager stores.

        Raises:
            RequestValidationError: the request breaks a rule; nothing was sent.
            APIStatusError: the server refused it (a subclass per status).
            ConnectionFailedError, DeadlineExceededError: no answer in time.
            ResponseFormatError: the answer is not a valid generation body.

        Examples:
            >>> client = OctoAIClient("t", base_url="http://127.0.0.1:9")
            >>> client.generate({"prompt": "a fox", "steps": 0})
            Traceback (most recent call last):
            ...
            dagster_octoai.api.errors.RequestValidationError: invalid image generation request: steps: ...
        """
        req = _build(request, engine)
        call = self._call("POST", self._generate_url(req.engine), "generate")
        response = self._send(call, content=req.wire_bytes(), idempotency_key=idempotency_key)
        result = parse_generation(response, call.where, self._redactor)._attach(
            req, call=call.info()
        )
        self._log_done(call.where, result)
        return result

    @overload
    def iter_generate(
        self,
        requests: Iterable[RequestLike],
        *,
        engine: Engine | str | None = ...,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> Generator[tuple[int, ImageGenerationResponse], None, None]: ...

    @overload
    def iter_generate(
        self,
        requests: Iterable[RequestLike],
        *,
        engine: Engine | str | None = ...,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[True],
    ) -> Generator[tuple[int, BatchItem], None, None]: ...

    def iter_generate(
        self,
        requests: Iterable[RequestLike],
        *,
        engine: Engine | str | None = None,
        max_concurrency: int | None = None,
        return_exceptions: bool = False,
    ) -> Generator[tuple[int, BatchItem], None, None]:
        """Generate a batch, yielding ``(input index, response)`` as each one completes.

        Requests are pulled from ``requests`` lazily, at most ``max_concurrency``
        (capped at the client's) in flight, so a batch of thousands streams in
        bounded memory. On an error no new request is started; the ones in flight
        finish and are yielded, then the first error is raised. With
        ``return_exceptions=True`` errors of this package are yielded in place of
        responses and the batch goes on.

        Examples:
            >>> client = OctoAIClient("t", base_url="http://127.0.0.1:9")
            >>> list(client.iter_generate([]))
            []
        """
        width = self._batch_width(max_concurrency)
        if width == 1:
            # One at a time: generate on the caller's thread. A pool thread would add two
            # thread hand-offs per image and overlap nothing (the next request is pulled
            # only when the caller asks for it); benchmark P6 runs this way.
            yield from self._iter_inline(requests, engine, return_exceptions)
            return
        source = enumerate(requests)
        pending: dict[Future[ImageGenerationResponse], int] = {}
        first_error: BaseException | None = None
        exhausted = False
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="octoai-generate") as pool:
            while True:
                while not exhausted and first_error is None and len(pending) < width:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    index, request = item
                    pending[pool.submit(self.generate, request, engine=engine)] = index
                if not pending:
                    break
                done, _ = wait_futures(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=pending.__getitem__):
                    index = pending.pop(future)
                    error = future.exception()
                    if error is None:
                        yield index, future.result()
                    elif return_exceptions and isinstance(error, OctoAIError):
                        yield index, error
                    elif first_error is None:
                        first_error = error
        if first_error is not None:
            raise first_error

    def _iter_inline(
        self, requests: Iterable[RequestLike], engine: Engine | str | None, return_exceptions: bool
    ) -> Generator[tuple[int, BatchItem], None, None]:
        for index, request in enumerate(requests):
            try:
                response = self.generate(request, engine=engine)
            except OctoAIError as error:
                if not return_exceptions:
                    raise
                yield index, error
            else:
                yield index, response

    @overload
    def generate_many(
        self,
        requests: Iterable[RequestLike],
        *,
        engine: Engine | str | None = ...,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> list[ImageGenerationResponse]: ...

    @overload
    def generate_many(
        self,
        requests: Iterable[RequestLike],
        *,
        engine: Engine | str | None = ...,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[True],
    ) -> list[BatchItem]: ...

    def generate_many(
        self,
        requests: Iterable[RequestLike],
        *,
        engine: Engine | str | None = None,
        max_concurrency: int | None = None,
        return_exceptions: bool = False,
    ) -> list[ImageGenerationResponse] | list[BatchItem]:
        """Generate a batch concurrently; the answers come back in input order.

        Raises the first error once the requests in flight have finished (no new
        ones start after it), or with ``return_exceptions=True`` puts each error of
        this package in its request's place. See :meth:`iter_generate` to stream.
        """
        out: dict[int, BatchItem] = {}
        if return_exceptions:
            for index, item in self.iter_generate(
                requests, engine=engine, max_concurrency=max_concurrency, return_exceptions=True
            ):
                out[index] = item
            return [out[i] for i in range(len(out))]
        results: dict[int, ImageGenerationResponse] = dict(
            self.iter_generate(requests, engine=engine, max_concurrency=max_concurrency)
        )
        return [results[i] for i in range(len(results))]

    # ---- async jobs ------------------------------------------------------------------

    def submit(
        self,
        request: RequestLike,
        *,
        engine: Engine | str | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """Start an async generation (``X-OctoAI-Async: 1``); returns the job to poll.

        Bodies over 10 MB are refused before sending (:class:`RequestValidationError`).
        ``idempotency_key`` (the ``Idempotency-Key`` header): a server that honours it
        (this package's does) answers a repeat of the same key and body with the first
        job instead of paying again, so a submission whose answer was lost on the wire,
        retried, is paid once; the same key with another body is a 409.
        """
        req = _build(request, engine)
        body = self._submit_body(req)
        call = self._call("POST", self._generate_url(req.engine), "submit")
        response = self._send(call, content=body, async_=True, idempotency_key=idempotency_key)
        job = parse_job(response, call.where, self._redactor, req, self._base_url)
        logger.info("%s: submitted async job %s", call.where, job.response_id)
        return job

    def poll(self, job: AnyJob | str) -> PollResult:
        """One status check of a job (or of a ``poll_url``, followed as given).

        Raises:
            JobExpiredError: the job's result was deleted after its time (404, expired).
            JobUnknownError: the id is unknown here, or another token's (404).
        """
        return self._poll(job, None)

    def _poll(self, job: AnyJob | str, deadline: float | None) -> PollResult:
        url, response_id = self._poll_target(job)
        call = self._call("GET", url, "poll", deadline=deadline, response_id=response_id)
        result = parse_poll(self._send(call), call.where, self._redactor, response_id)
        logger.debug("job %s: %s", response_id or url, result.raw_status)
        return result

    def cancel(self, job: AnyJob | str) -> PollResult:
        """Cancel a job (``DELETE`` its poll URL): a pending one at once, a running one at its
        next step, on a server that supports it (this package's does; OctoAI had no such
        route). Returns the job's status after the request: ``cancelled``, or the status it
        had already ended in.

        Raises:
            JobExpiredError, JobUnknownError: as :meth:`poll`.
        """
        url, response_id = self._poll_target(job)
        call = self._call("DELETE", url, "poll", response_id=response_id)
        return parse_poll(self._send(call), call.where, self._redactor, response_id)

    def fetch(self, job: AsyncJob | str) -> ImageGenerationResponse:
        """The result of a completed job, or of a ``response_url`` given as a str.

        Given an :class:`AsyncJob`, polls once for its ``response_url``; the answer carries
        the job's request and ``response_id``. One fetched by a bare URL knows neither, so
        an image IO manager cannot store it with its lineage: fetch the job instead.

        Raises:
            JobExpiredError: the result is gone (kept 24 hours).
            JobFailedError: the job failed.
            OctoAIError: the job is not completed yet.
        """
        return self._fetch(job, None)

    def _fetch(self, job: AsyncJob | str, deadline: float | None) -> ImageGenerationResponse:
        if isinstance(job, AsyncJob):
            result = self._poll(job, deadline)
            url = self._completed_url(result, job.response_id)
            if url is None:
                raise _not_ready(job, result)
            return self._fetch_url(url, job, deadline)
        return self._fetch_url(self._trusted_url(job, "response_url", None), None, deadline)

    def _fetch_url(
        self, url: str, job: AsyncJob | None, deadline: float | None
    ) -> ImageGenerationResponse:
        response_id = None if job is None else job.response_id
        call = self._call("GET", url, "fetch", deadline=deadline, response_id=response_id)
        response = self._send(call)
        return _job_answer(
            parse_generation(response, call.where, self._redactor, response_id), job, call
        )

    def wait(
        self,
        job: AsyncJob,
        *,
        timeout: float = 600.0,
        poll_interval_s: float = 0.5,
        max_poll_interval_s: float = 10.0,
    ) -> ImageGenerationResponse:
        """Poll a job until it completes, then fetch its result.

        Polls back off exponentially from ``poll_interval_s`` to
        ``max_poll_interval_s``. A ``failed`` status raises :class:`JobFailedError`
        (``cancelled``: :class:`JobCancelledError`), an expired result
        :class:`JobExpiredError` and an unknown id :class:`JobUnknownError`, at once; any
        other status (including ones this client does not know) is polled until
        ``timeout``, then :class:`DeadlineExceededError`. A server that cannot be reached
        or answers 502/503/504 (restarting) is polled again until ``timeout`` too: its jobs
        survive a restart.
        """
        wait = _JobWait(job, timeout, poll_interval_s, max_poll_interval_s)
        while True:
            try:
                result = self._poll(job, wait.deadline)
                url = self._completed_url(result, job.response_id)
                if url is not None:
                    answer = self._fetch_url(url, job, wait.deadline)
                    self._log_done(f"job {job.response_id}", answer)
                    return answer
            except (ConnectionFailedError, ServerError) as exc:
                time.sleep(wait.outage(exc))
                wait.check(None)
                continue
            time.sleep(wait.pause(result))
            wait.check(result)

    # ---- health ----------------------------------------------------------------------

    def health(self) -> bool:
        """True when ``GET {base_url}/healthcheck`` answers 2xx; one quick attempt, never raises."""
        call = self._call(
            "GET",
            f"{self._base_url}/healthcheck",
            "health",
            retry=HTTPRetryPolicy.none(),
            timeout=httpx.Timeout(min(_HEALTH_TIMEOUT_S, self._timeout.read or _HEALTH_TIMEOUT_S)),
        )
        try:
            self._send(call)
        except OctoAIError as exc:
            logger.info("health check failed: %s", exc)
            return False
        return True


class _Slot:
    """Holds one of the client's generation slots for one attempt, bounded by the deadline."""

    def __init__(self, semaphore: threading.BoundedSemaphore | None, call: Call) -> None:
        self._semaphore = semaphore
        self._call = call

    def __enter__(self) -> None:
        if self._semaphore is None:
            return
        remaining = self._call.remaining()
        if not self._semaphore.acquire(timeout=None if remaining is None else max(remaining, 0)):
            raise self._call.deadline_error()

    def __exit__(self, *exc: object) -> None:
        if self._semaphore is not None:
            self._semaphore.release()


class AsyncOctoAIClient(
    AsyncVideoCalls, _ClientBase[httpx.AsyncClient, httpx.AsyncHTTPTransport, asyncio.Semaphore]
):
    """The asyncio twin of :class:`OctoAIClient`: same arguments, ``async`` methods.

    Use it from one event loop; ``max_concurrency`` bounds the generations in flight
    with an ``asyncio.Semaphore``.

    Examples:
        >>> import asyncio
        >>> async def main() -> str:
        ...     async with AsyncOctoAIClient("t", base_url="http://127.0.0.1:9") as client:
        ...         return repr(client)
        >>> asyncio.run(main())
        "AsyncOctoAIClient(base_url='http://127.0.0.1:9', token=***)"
    """

    _transport_type = httpx.AsyncHTTPTransport
    _http_type = httpx.AsyncClient

    def _new_slots(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self._max_concurrency)

    async def close(self) -> None:
        """Close the connection pool (not an ``http_client`` that was passed in)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncOctoAIClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _send(
        self,
        call: Call,
        *,
        content: bytes | None = None,
        async_: bool = False,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        if content is not None and idempotency_key is None:
            # One key per logical call: its retries are repeats the server answers once.
            idempotency_key = secrets.token_urlsafe(18)
        call.idempotent = idempotency_key is not None
        hdrs = self._request_headers(async_, content is not None, idempotency_key)
        bounded = call.kind == "generate"
        while True:
            timeout = call.start_attempt()
            if bounded:
                await self._acquire(call)
            failure: httpx.TransportError | None = None
            try:
                if self._direct is None:
                    response = await self._http.request(
                        call.method, call.url, content=content, headers=hdrs, timeout=timeout
                    )
                else:
                    request = direct_request(call, content, hdrs, timeout)
                    response = await self._direct.handle_async_request(request)
                    response.request = request
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
            except httpx.TransportError as exc:
                failure = exc  # handled outside the except block, as in OctoAIClient._send
            finally:
                if bounded:
                    self._slots.release()
            if failure is not None:
                wait = call.on_transport_error(failure)
            else:
                retry_wait = call.on_response(response)
                if retry_wait is None:
                    return response
                wait = retry_wait
            await asyncio.sleep(wait)

    async def _acquire(self, call: Call) -> None:
        remaining = call.remaining()
        if remaining is None:
            await self._slots.acquire()
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), max(remaining, 0))
        except asyncio.TimeoutError:
            raise call.deadline_error() from None

    async def generate(
        self,
        request: RequestLike,
        *,
        engine: Engine | str | None = None,
        idempotency_key: str | None = None,
    ) -> ImageGenerationResponse:
        """Generate images and wait for them; see :meth:`OctoAIClient.generate`."""
        req = _build(request, engine)
        call = self._call("POST", self._generate_url(req.engine), "generate")
        response = await self._send(call, content=req.wire_bytes(), idempotency_key=idempotency_key)
        result = parse_generation(response, call.where, self._redactor)._attach(
            req, call=call.info()
        )
        self._log_done(call.where, result)
        return result

    @overload
    def iter_generate(
        self,
        requests: Iterable[RequestLike] | AsyncIterable[RequestLike],
        *,
        engine: Engine | str | None = ...,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> AsyncGenerator[tuple[int, ImageGenerationResponse], None]: ...

    @overload
    def iter_generate(
        self,
        requests: Iterable[RequestLike] | AsyncIterable[RequestLike],
        *,
        engine: Engine | str | None = ...,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[True],
    ) -> AsyncGenerator[tuple[int, BatchItem], None]: ...

    async def iter_generate(
        self,
        requests: Iterable[RequestLike] | AsyncIterable[RequestLike],
        *,
        engine: Engine | str | None = None,
        max_concurrency: int | None = None,
        return_exceptions: bool = False,
    ) -> AsyncGenerator[tuple[int, BatchItem], None]:
        """Yield ``(input index, response)`` as each completes; see :meth:`OctoAIClient.iter_generate`.

        ``requests`` may be an async iterable. Leaving the loop early cancels the
        generations still in flight.
        """
        width = self._batch_width(max_concurrency)
        source = _aenumerate(requests)
        pending: dict[asyncio.Task[ImageGenerationResponse], int] = {}
        first_error: BaseException | None = None
        exhausted = False
        try:
            while True:
                while not exhausted and first_error is None and len(pending) < width:
                    try:
                        index, request = await source.__anext__()
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    task = asyncio.ensure_future(self.generate(request, engine=engine))
                    pending[task] = index
                if not pending:
                    break
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=pending.__getitem__):
                    index = pending.pop(task)
                    error = task.exception()
                    if error is None:
                        yield index, task.result()
                    elif return_exceptions and isinstance(error, OctoAIError):
                        yield index, error
                    elif first_error is None:
                        first_error = error
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if first_error is not None:
            raise first_error

    @overload
    async def generate_many(
        self,
        requests: Iterable[RequestLike] | AsyncIterable[RequestLike],
        *,
        engine: Engine | str | None = ...,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> list[ImageGenerationResponse]: ...

    @overload
    async def generate_many(
        self,
        requests: Iterable[RequestLike] | AsyncIterable[RequestLike],
        *,
        engine: Engine | str | None = ...,
        max_concurrency: int | None = ...,
        return_exceptions: Literal[True],
    ) -> list[BatchItem]: ...

    async def generate_many(
        self,
        requests: Iterable[RequestLike] | AsyncIterable[RequestLike],
        *,
        engine: Engine | str | None = None,
        max_concurrency: int | None = None,
        return_exceptions: bool = False,
    ) -> list[ImageGenerationResponse] | list[BatchItem]:
        """Generate a batch concurrently, answers in input order; see :meth:`OctoAIClient.generate_many`."""
        if return_exceptions:
            out: dict[int, BatchItem] = {}
            async for index, item in self.iter_generate(
                requests, engine=engine, max_concurrency=max_concurrency, return_exceptions=True
            ):
                out[index] = item
            return [out[i] for i in range(len(out))]
        results: dict[int, ImageGenerationResponse] = {}
        async for index, response in self.iter_generate(
            requests, engine=engine, max_concurrency=max_concurrency
        ):
            results[index] = response
        return [results[i] for i in range(len(results))]

    async def submit(
        self,
        request: RequestLike,
        *,
        engine: Engine | str | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """Start an async generation; see :meth:`OctoAIClient.submit`."""
        req = _build(request, engine)
        body = self._submit_body(req)
        call = self._call("POST", self._generate_url(req.engine), "submit")
        response = await self._send(
            call, content=body, async_=True, idempotency_key=idempotency_key
        )
        job = parse_job(response, call.where, self._redactor, req, self._base_url)
        logger.info("%s: submitted async job %s", call.where, job.response_id)
        return job

    async def poll(self, job: AnyJob | str) -> PollResult:
        """One status check; see :meth:`OctoAIClient.poll`."""
        return await self._poll(job, None)

    async def _poll(self, job: AnyJob | str, deadline: float | None) -> PollResult:
        url, response_id = self._poll_target(job)
        call = self._call("GET", url, "poll", deadline=deadline, response_id=response_id)
        result = parse_poll(await self._send(call), call.where, self._redactor, response_id)
        logger.debug("job %s: %s", response_id or url, result.raw_status)
        return result

    async def cancel(self, job: AnyJob | str) -> PollResult:
        """Cancel a job; see :meth:`OctoAIClient.cancel`."""
        url, response_id = self._poll_target(job)
        call = self._call("DELETE", url, "poll", response_id=response_id)
        return parse_poll(await self._send(call), call.where, self._redactor, response_id)

    async def fetch(self, job: AsyncJob | str) -> ImageGenerationResponse:
        """The result of a completed job; see :meth:`OctoAIClient.fetch`."""
        if isinstance(job, AsyncJob):
            result = await self._poll(job, None)
            url = self._completed_url(result, job.response_id)
            if url is None:
                raise _not_ready(job, result)
            return await self._fetch_url(url, job, None)
        return await self._fetch_url(self._trusted_url(job, "response_url", None), None, None)

    async def _fetch_url(
        self, url: str, job: AsyncJob | None, deadline: float | None
    ) -> ImageGenerationResponse:
        response_id = None if job is None else job.response_id
        call = self._call("GET", url, "fetch", deadline=deadline, response_id=response_id)
        response = await self._send(call)
        return _job_answer(
            parse_generation(response, call.where, self._redactor, response_id), job, call
        )

    async def wait(
        self,
        job: AsyncJob,
        *,
        timeout: float = 600.0,
        poll_interval_s: float = 0.5,
        max_poll_interval_s: float = 10.0,
    ) -> ImageGenerationResponse:
        """Poll until completed, then fetch; see :meth:`OctoAIClient.wait`."""
        wait = _JobWait(job, timeout, poll_interval_s, max_poll_interval_s)
        while True:
            try:
                result = await self._poll(job, wait.deadline)
                url = self._completed_url(result, job.response_id)
                if url is not None:
                    answer = await self._fetch_url(url, job, wait.deadline)
                    self._log_done(f"job {job.response_id}", answer)
                    return answer
            except (ConnectionFailedError, ServerError) as exc:
                await asyncio.sleep(wait.outage(exc))
                wait.check(None)
                continue
            await asyncio.sleep(wait.pause(result))
            wait.check(result)

    async def health(self) -> bool:
        """True when ``GET {base_url}/healthcheck`` answers 2xx; never raises."""
        call = self._call(
            "GET",
            f"{self._base_url}/healthcheck",
            "health",
            retry=HTTPRetryPolicy.none(),
            timeout=httpx.Timeout(min(_HEALTH_TIMEOUT_S, self._timeout.read or _HEALTH_TIMEOUT_S)),
        )
        try:
            await self._send(call)
        except OctoAIError as exc:
            logger.info("health check failed: %s", exc)
            return False
        return True


async def _aenumerate(
    items: Iterable[RequestLike] | AsyncIterable[RequestLike],
) -> AsyncIterator[tuple[int, RequestLike]]:
    index = 0
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield index, item
            index += 1
    else:
        for item in items:
            yield index, item
            index += 1
