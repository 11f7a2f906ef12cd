"""A tiny real HTTP server whose answers each test scripts.

A Starlette app served by uvicorn on 127.0.0.1 (port 0) in a background thread.
Each request takes the next scripted :class:`Reply` (or the default one, or the
result of a callable), and is recorded, so tests can check what went over the
wire: headers, bodies, attempts. A reply can be delayed (read timeouts) or cut
off mid-body (a dropped connection).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from PIL import Image
from starlette.types import Receive, Scope, Send


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: Any = None  # dict/list -> JSON, str/bytes -> as is
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None  # default: JSON for dict/list bodies, else text/plain
    delay_s: float = 0.0  # wait before answering
    drop: bool = False  # send the headers and part of the body, then close the connection

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, dict | list):
            return json.dumps(self.body).encode(), self.content_type or "application/json"
        if isinstance(self.body, str):
            return self.body.encode(), self.content_type or "text/plain; charset=utf-8"
        return (self.body or b""), self.content_type or "application/octet-stream"


@dataclass
class Recorded:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Gauge:
    now: int = 0
    peak: int = 0


ReplySource = Reply | Callable[[Recorded], Reply]


class ScriptedServer:
    """Serve scripted replies; see the module docstring."""

    def __init__(self) -> None:
        self._script: deque[ReplySource] = deque()
        self.default: ReplySource = Reply(500, {"message": "unscripted request"})
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._gauge = _Gauge()
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ---- scripting -------------------------------------------------------------------

    def script(self, *replies: ReplySource) -> None:
        """Queue replies, answered in order before the default."""
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        """Forget the script, the recorded requests and the in-flight peak."""
        with self._lock:
            self._script.clear()
            self.default = Reply(500, {"message": "unscripted request"})
            self.requests.clear()
            # Requests of an earlier test may still be running: they count on the old gauge.
            self._gauge = _Gauge()

    @property
    def max_in_flight(self) -> int:
        """Most requests answered at once since the last reset."""
        return self._gauge.peak

    def paths(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]

    # ---- the ASGI app ----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        record = Recorded(
            method=scope["method"],
            path=scope["path"],
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=body,
            at=time.monotonic(),
        )
        with self._lock:
            self.requests.append(record)
            source = self._script.popleft() if self._script else self.default
            gauge = self._gauge
            gauge.now += 1
            gauge.peak = max(gauge.peak, gauge.now)
        try:
            reply = source(record) if callable(source) else source
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            payload, ctype = reply.encoded()
            hdrs = [(b"content-type", ctype.encode())]
            hdrs += [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
            if reply.drop:
                # Promise more body than is sent, then fail: uvicorn closes the connection.
                hdrs.append((b"content-length", str(len(payload) + 1000).encode()))
                await send({"type": "http.response.start", "status": reply.status, "headers": hdrs})
                await send({"type": "http.response.body", "body": payload[:5], "more_body": True})
                raise ConnectionAbortedError("scripted drop")
            hdrs.append((b"content-length", str(len(payload)).encode()))
            await send({"type": "http.response.start", "status": reply.status, "headers": hdrs})
            await send({"type": "http.response.body", "body": payload})
        finally:
            with self._lock:
                gauge.now -= 1

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, *, tls: tuple[str, str] | None = None) -> None:
        """Serve on a free port; ``tls=(certfile, keyfile)`` serves HTTPS."""
        config = uvicorn.Config(
            self,
            host="127.0.0.1",
            port=0,
            log_level="critical",
            lifespan="on",
            timeout_graceful_shutdown=1,
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="scripted-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("scripted server did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self._server, self._thread = server, thread

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)


@contextmanager
def scripted_server() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---- fixtures (a module imports them and names them in its __all__) ----------------------


@pytest.fixture(scope="module")
def module_scripted_server() -> Iterator[ScriptedServer]:
    """One scripted server per test module."""
    with scripted_server() as server:
        yield server


@pytest.fixture
def server(module_scripted_server: ScriptedServer) -> ScriptedServer:
    """The module's scripted server, its script and records cleared for this test."""
    module_scripted_server.reset()
    return module_scripted_server


# ---- bodies ----------------------------------------------------------------------------


def jpeg_bytes(
    size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (0, 0, 255, 128)).save(buf, format="PNG")
    return buf.getvalue()


def ok(seeds: list[int] | None = None, request_id: str | None = None) -> Reply:
    """A 200 generation answer for ``seeds``, with ``X-User-Request-ID`` when given."""
    headers = {"X-User-Request-ID": request_id} if request_id else {}
    return Reply(200, generation_body(seeds), headers=headers)


def generation_body(
    seeds: list[int] | None = None, *, removed: set[int] | None = None, data: bytes | None = None
) -> dict[str, Any]:
    """A valid generation body with one small JPEG per seed."""
    seeds = seeds if seeds is not None else [42]
    image = base64.b64encode(data or jpeg_bytes()).decode()
    removed = removed or set()
    return {
        "images": [
            {
                "image_b64": None if s in removed else image,
                "seed": s,
                "removed_for_safety": s in removed,
                "safety_score": 0.9 if s in removed else 0.01,
            }
            for s in seeds
        ],
        "prediction_time_ms": 12.5,
    }
