"""What one request may cost the server: body size and time, JSON shape, input image pixels.

- :class:`BodyLimits` (ASGI middleware) reads a request body before any route sees it:
  a declared ``Content-Length`` over the limit is a 413 without reading a byte, a body
  that grows past it (chunked) is cut off with a 413, and a body that does not arrive in
  time (``body_timeout_s``, plus a second per ``min_body_rate`` bytes) is a 408. Both close
  the connection.
- :func:`parse_json_body` turns bytes into JSON values or a 422: any nesting depth, any
  number of digits, lone surrogates, ``NaN``: the answer is a 422, never a 500.
- :func:`oversized_images` reads each input image's header (its width and height) and
  refuses one with more pixels than the engine can use (inputs are resized to the output
  size) before anything decodes it at full size.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pydantic_core
from PIL import Image

from ..api.images import decode_base64_image
from ..api.models import IMAGE_FIELDS, ImageGenerationRequest
from .config import ServerConfig

__all__ = ["BodyLimits", "oversized_images", "parse_json_body", "undecodable_images"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: A 422 detail entry before ``"body"`` is prepended: (location, message).
Problem = tuple[tuple[str | int, ...], str]

_ASYNC_HEADER = b"x-octoai-async"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_async_request(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether ``X-OctoAI-Async`` asks for an async job."""
    for name, value in headers:
        if name.lower() == _ASYNC_HEADER:
            return value.strip().lower() in (b"1", b"true")
    return False


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | str | None:
    """The declared length, None when absent, or a message when it is not a number."""
    for name, value in headers:
        if name.lower() == b"content-length":
            text = value.strip()
            if not text.isdigit() or len(text) > 18:
                return f"Content-Length {value[:40]!r} is not a byte count"
            return int(text)
    return None


async def _answer(send: Send, status: int, message: str) -> None:
    """A JSON error that closes the connection: the unread rest of the body is never read."""
    body = json.dumps({"message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    """Reads each request body within its size and time limits, then hands it on whole.

    The limit is ``async_body_limit_bytes`` for an async generate request (the seed: 10 MB)
    and ``max_body_bytes`` for any other. ``config`` is read per request, so a runtime
    change applies to the next one.
    """

    def __init__(self, app: ASGIApp, config: Callable[[], ServerConfig]) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        config = self.config()
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted below a prefix (a Ray Serve route)
            path = path[len(root) :]
        is_async = is_async_request(headers) and path.startswith("/generate/")
        limit = config.async_body_limit_bytes if is_async else config.max_body_bytes
        kind = "Async request body" if is_async else "Request body"
        declared = _content_length(headers)
        if isinstance(declared, str):
            await _answer(send, 400, declared)
            return
        if declared is not None and declared > limit:
            await _answer(send, 413, f"{kind} is {declared} bytes; the limit is {limit} bytes.")
            return
        expected = declared if declared is not None else 0
        allowed_s = config.body_timeout_s + expected / config.min_body_rate
        deadline = time.monotonic() + allowed_s
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                await _answer(
                    send,
                    408,
                    f"{kind} did not arrive within {allowed_s:.3g} s; send it faster or "
                    "in one piece.",
                )
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _answer(send, 413, f"{kind} is over the limit of {limit} bytes.")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def parse_json_body(raw: bytes) -> tuple[Any, list[dict[str, Any]] | None]:
    """(value, None), or (None, a 422 detail) for bytes that are not one JSON value.

    pydantic-core's parser bounds nesting depth and refuses numbers too long to convert,
    lone surrogates and ``NaN``/``Infinity``; the standard library would raise
    ``RecursionError`` or ``ValueError`` (a 500) on the first two and accept the rest.
    """
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=False), None
    except ValueError as exc:
        return None, [{"loc": ["body"], "msg": f"JSON decode error: {exc}", "type": "json_invalid"}]


def _image_fields(request: ImageGenerationRequest) -> list[tuple[tuple[str | int, ...], str]]:
    fields: list[tuple[tuple[str | int, ...], str]] = [
        ((name,), value) for name in IMAGE_FIELDS if (value := getattr(request, name)) is not None
    ]
    for word, images in (request.transfer_images or {}).items():
        fields.extend(((("transfer_images", word, i), b64) for i, b64 in enumerate(images)))
    return fields


def oversized_images(request: ImageGenerationRequest, config: ServerConfig) -> list[Problem]:
    """(loc, message) of every input image with more pixels than the output can use.

    Only the header is read (``Image.open`` is lazy), so a 12000x12000 PNG costs its
    compressed bytes, not the 430 MB it decodes to. The limit is ``max_input_image_scale``
    squared times the output's pixels: 4x (2048x2048 for a 1024x1024 output) by default.
    """
    width, height = request.size
    scale = config.max_input_image_scale
    max_pixels = int(width * height * scale * scale)
    problems: list[Problem] = []
    for loc, b64 in _image_fields(request):
        try:
            with warnings.catch_warnings():
                # The bomb warning is Pillow's view of the same thing, said below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(decode_base64_image(b64))) as im:
                    w, h = im.size
        except Image.DecompressionBombError:
            problems.append((loc, f"the image has too many pixels; at most {max_pixels:,}"))
            continue
        except Exception:  # undecodable images get their own 422 from the full check
            continue
        if w * h > max_pixels:
            problems.append(
                (
                    loc,
                    f"the image is {w}x{h} ({w * h:,} pixels); at most {max_pixels:,} pixels "
                    f"({scale:g}x the {width}x{height} output in each direction): input "
                    "images are resized to the output size, so resize it first",
                )
            )
    return problems


def header_timeout_protocol(timeout_s: float) -> type[Any]:
    """uvicorn's HTTP protocol class, closing connections whose headers are too slow.

    uvicorn times out an idle keep-alive connection, but not one that is sending its
    headers a byte at a time (slowloris): that one would stay open for ever. The timer
    starts when the connection opens and again after each answer, and closes the
    connection unless a request has started by then.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # a plain `pip install uvicorn` has no httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class HeaderTimeoutProtocol(Base):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def undecodable_images(request: ImageGenerationRequest) -> list[Problem]:
    """(loc, message) of every image field whose bytes do not decode as a whole image.

    The request model only checks that an image field is base64 with an image's magic
    bytes; a truncated or corrupt picture must be the client's 422, not a renderer crash.
    """
    problems: list[Problem] = []
    for loc, b64 in _image_fields(request):
        try:
            with Image.open(io.BytesIO(decode_base64_image(b64))) as im:
                im.load()
        except Exception as exc:  # PIL raises many types for bad data; all mean the same here
            problems.append((loc, f"the image does not decode ({type(exc).__name__}: {exc})"))
    return problems
