"""Running the server: in the foreground (the CLI), or as :class:`LocalOctoAIServer`.

:class:`LocalOctoAIServer` starts uvicorn on a free loopback port, either in a thread
of this process (fast, for tests) or in a child process (``mode="process"``: a client
under load in this process does not slow the server, as in benchmarks and demos).
The listening socket is bound here and handed over, so the port is known before the
server starts and no other process can take it in between.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Literal

from .._process import StartStopContext, stop_process, wait_until_ready
from .config import ServerConfig

if TYPE_CHECKING:
    # Imported where used: httpx pulls in its own CLI (click, rich), which would add
    # a few hundred milliseconds to every server start for nothing.
    import httpx

__all__ = ["CONFIG_ENV", "LocalOctoAIServer", "TLSFiles", "bind_socket", "serve"]

#: The child process reads its whole configuration (token included) from this variable,
#: so that the token never appears on a command line.
CONFIG_ENV = "DAGSTER_OCTOAI_SERVER_CONFIG"

#: Idle connections stay at least this long: past httpx's 5 s keep-alive expiry.
_KEEP_ALIVE_MIN_S = 10
# uvicorn's graceful shutdown takes up to 3 s (timeout_graceful_shutdown below).
_STOP_GRACE_S = 5.0


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    return sock


def _uvicorn_server(
    config: ServerConfig,
    log_level: str,
    app: Any = None,
    *,
    tls: TLSFiles | None = None,
    forwarded_allow_ips: str | None = None,
    access_log: bool = False,
) -> Any:
    import uvicorn

    from .app import create_app
    from .limits import header_timeout_protocol

    uv_config = uvicorn.Config(
        create_app(config) if app is None else app,
        log_level=log_level,
        # Off for tests and demos; an operator turns it on (paths hold no tokens).
        access_log=access_log,
        lifespan="on",
        # No websockets here; "auto" would import a websockets library on every start.
        ws="none",
        # A slow fault or a long latency must not hold a shutdown for long.
        timeout_graceful_shutdown=3,
        # Slow headers close the connection (uvicorn alone would keep it for ever).
        http=header_timeout_protocol(config.header_timeout_s),
        # An idle connection is closed when its next request's headers are due (the
        # header timer), not at uvicorn's 5 s: httpx also drops an idle connection at
        # 5 s, and with both at 5 s a request sent as the server closed its connection
        # failed with ReadError or RemoteProtocolError (benchmark P8's 2,000-job run).
        timeout_keep_alive=max(_KEEP_ALIVE_MIN_S, math.ceil(config.header_timeout_s)),
        limit_concurrency=config.max_connections,
        # "server: uvicorn" tells a scanner which bugs to try; nothing else needs it.
        server_header=False,
        forwarded_allow_ips=forwarded_allow_ips,
        **(tls.uvicorn_options() if tls is not None else {}),
    )
    return uvicorn.Server(uv_config)


class TLSFiles:
    """A certificate and its key for HTTPS (the key's password from an env variable)."""

    def __init__(self, certfile: str, keyfile: str, password_env: str | None = None) -> None:
        self.certfile = certfile
        self.keyfile = keyfile
        self.password_env = password_env

    def uvicorn_options(self) -> dict[str, Any]:
        password = os.environ.get(self.password_env) if self.password_env else None
        return {
            "ssl_certfile": self.certfile,
            "ssl_keyfile": self.keyfile,
            "ssl_keyfile_password": password,
        }


def serve(
    config: ServerConfig,
    sock: socket.socket,
    *,
    log_level: str = "info",
    app: Any = None,
    tls: TLSFiles | None = None,
    forwarded_allow_ips: str | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``app`` (default: ``create_app(config)``) on ``sock`` until SIGINT or SIGTERM."""
    _uvicorn_server(
        config,
        log_level,
        app,
        tls=tls,
        forwarded_allow_ips=forwarded_allow_ips,
        access_log=access_log,
    ).run(sockets=[sock])


def _url(host: str, port: int) -> str:
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


#: :class:`LocalOctoAIServer`'s default start-up wait, per backend.
STARTUP_TIMEOUT_S = 30.0
DIFFUSERS_STARTUP_TIMEOUT_S = 900.0


class LocalOctoAIServer(StartStopContext):
    """The local OctoAI-compatible server on a free loopback port, for tests and demos.

    Use as a context manager (or call :meth:`start` and :meth:`stop`). ``url`` is the
    base URL for a client (``POST {url}/generate/{engine}``); ``stats()``,
    ``reset_stats()``, ``configure(...)`` and ``requests()`` talk to the ``/_local``
    routes, so they work in both modes.

    The harness turns those control routes on explicitly, with an admin token of its own
    (random, known only to this object) unless the configuration brings one; pass
    ``controls=False`` for a server exactly as ``dagster-octoai serve`` runs it. A
    configuration without a token (and not public) gets a random one: ``token`` says it.

    Examples:
        >>> import httpx
        >>> with LocalOctoAIServer(ServerConfig(token="t0k")) as srv:
        ...     r = httpx.post(f"{srv.url}/generate/sd", json={"prompt": "a fox", "seed": 1},
        ...                    headers={"Authorization": f"Bearer {srv.token}"})
        ...     r.status_code, srv.stats()["paid_generations"]
        (200, 1)
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        mode: Literal["thread", "process"] = "thread",
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        startup_timeout_s: float | None = None,
        controls: bool = True,
    ) -> None:
        if mode not in ("thread", "process"):
            raise ValueError(f"mode: {mode!r} is not a mode; allowed: 'thread', 'process'")
        if startup_timeout_s is not None and not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s: {startup_timeout_s!r} must be > 0 seconds")
        self._config = _harness_config(config or ServerConfig(), controls)
        self.mode = mode
        self.host = host
        self.port = port
        self.log_level = log_level
        #: How long :meth:`start` waits for the first health check. By default 30 s for the
        #: placeholder backend and 900 s for diffusers, which loads its base models (and
        #: warms them up) before it answers: real SDXL weights take minutes from a cold disk.
        self.startup_timeout_s = (
            startup_timeout_s
            if startup_timeout_s is not None
            else DIFFUSERS_STARTUP_TIMEOUT_S
            if self._config.backend == "diffusers"
            else STARTUP_TIMEOUT_S
        )
        #: Seconds from :meth:`start` until the server answered its first health check.
        self.startup_s: float | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._client: httpx.Client | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __repr__(self) -> str:
        state = f"url={self.url!r}" if self.running else "stopped"
        return f"LocalOctoAIServer(mode={self.mode!r}, {state})"

    # ---- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._client is not None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``."""
        if not self.running:
            raise RuntimeError("the server is not running; call start() or use 'with'")
        return _url(self.host, self.port)

    @property
    def token(self) -> str | None:
        """The accepted API token (``None`` on a public server without one)."""
        return self._config.token_value()

    @property
    def admin_token(self) -> str | None:
        """The control routes' token (``None`` with ``controls=False``)."""
        return self._config.admin_token_value()

    @property
    def config(self) -> ServerConfig:
        """The configuration in force, including changes made with :meth:`configure`."""
        return self._config

    def start(self) -> LocalOctoAIServer:
        """Start serving and wait until ``/healthcheck`` answers."""
        if self.running:
            return self
        started = time.perf_counter()
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        try:
            if self.mode == "thread":
                self._start_thread(sock)
            else:
                self._start_process(sock)
            import httpx

            admin = self._config.admin_token_value()
            headers = {} if admin is None else {"Authorization": f"Bearer {admin}"}
            self._client = httpx.Client(base_url=_url(self.host, self.port), headers=headers)
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def _start_thread(self, sock: socket.socket) -> None:
        server = _uvicorn_server(self._config, self.log_level)
        self._server = server
        self._thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"octoai-local-server:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _start_process(self, sock: socket.socket) -> None:
        env = {**os.environ, CONFIG_ENV: json.dumps(self._config.secret_dict())}
        fd = sock.fileno()
        cmd = [
            sys.executable,
            "-m",
            "dagster_octoai.server",
            "--fd",
            str(fd),
            "--log-level",
            self.log_level,
        ]
        # Kept open for the child's lifetime (closed in stop()), so no 'with'.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                cmd,
                env=env,
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                # Its own session: a Ctrl-C meant for the test run does not kill it mid-test;
                # stop() (or the finalizer at exit) ends it.
                start_new_session=True,
            )
        finally:
            sock.close()
        self._finalizer = weakref.finalize(
            self, stop_process, self._proc, grace_s=_STOP_GRACE_S, reap_s=_STOP_GRACE_S
        )

    def _wait_healthy(self, started: float) -> None:
        wait_until_ready(
            self._not_healthy,
            # The startup timeout counts from start(), binding and spawning included.
            timeout_s=self.startup_timeout_s - (time.perf_counter() - started),
            # In a thread, uvicorn's started flag is checked in memory and the first health
            # check after it succeeds; a child process is asked over HTTP, so less often.
            interval_s=0.005 if self._server is not None else 0.02,
            on_timeout=lambda reason: TimeoutError(
                f"the local OctoAI server did not answer /healthcheck within "
                f"{self.startup_timeout_s:g} s ({reason}); a slower start needs a larger "
                "LocalOctoAIServer(startup_timeout_s=...)"
            ),
        )

    def _not_healthy(self) -> str | None:
        """Why the server does not serve yet, or None; raises if it stopped while starting."""
        import httpx

        assert self._client is not None
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("the local OctoAI server thread stopped during startup")
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(
                f"the local OctoAI server process exited with {self._proc.returncode} "
                f"during startup: {self._child_stderr()}"
            )
        if self._server is not None and not self._server.started:
            return "uvicorn has not started yet"
        try:
            status = self._client.get("/healthcheck", timeout=2.0).status_code
        except httpx.TransportError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if status == 200 else f"HTTP {status} from /healthcheck"

    def _child_stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        data: bytes = self._stderr.read()
        return data.decode(errors="replace")[-2000:].strip()

    def stop(self) -> None:
        """Stop serving (in-flight requests get a few seconds to finish)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._server = None
        if self._proc is not None:
            stop_process(self._proc, grace_s=_STOP_GRACE_S, reap_s=_STOP_GRACE_S)
            self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    @property
    def pid(self) -> int | None:
        """The server's process id with ``mode="process"`` (None in a thread or stopped)."""
        return None if self._proc is None else self._proc.pid

    def kill(self, sig: int = 9, *, timeout_s: float = 60.0) -> int | None:
        """Send ``sig`` (default SIGKILL) to the server's child process and wait for it to end.

        For crash and restart tests (``mode="process"`` only): SIGKILL is a crash, SIGTERM
        a graceful stop that lets running async jobs finish. Returns the exit code; the
        object is stopped afterwards, and a new one on the same ``port`` and store is the
        restarted server.
        """
        if self._proc is None:
            raise RuntimeError("kill() needs a running server with mode='process'")
        self._proc.send_signal(sig)
        try:
            code = self._proc.wait(timeout=timeout_s)
        finally:
            self.stop()
        return code

    # ---- the /_local controls -----------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        if self._client is None:
            raise RuntimeError("the server is not running; call start() or use 'with'")
        if not self._config.control_routes:
            raise RuntimeError(
                "the control routes are off on this server (controls=False); stats(), "
                "requests() and configure() need them"
            )
        response = self._client.request(method, path, json=body, timeout=30.0)
        if response.status_code == 422:
            raise ValueError(f"invalid server configuration: {response.json()['detail']}")
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        """The request log's counts (``GET /_local/stats``).

        Keys: ``requests`` (route -> status -> count), ``paid_generations`` (images
        rendered), ``generation_requests``, ``in_flight_max``, ``queued_max``,
        ``async_jobs`` (by status, plus ``submitted`` and ``expired``), ``faults`` (by
        kind), ``rate_limited``, ``policy_rejections``, ``validation_errors``, ...
        """
        result: dict[str, Any] = self._call("GET", "/_local/stats")
        return result

    def reset_stats(self) -> None:
        """Zero every count and clear the request log."""
        self._call("DELETE", "/_local/stats")

    def requests(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` requests: route, status, fault, engine, images, seeds, ids."""
        result: list[dict[str, Any]] = self._call("GET", f"/_local/requests?limit={limit}")
        return result

    def configure(self, **changes: Any) -> ServerConfig:
        """Change the running server, e.g. ``configure(latency_per_image_s=0.5)``.

        ``faults`` may be a :class:`FaultConfig` or a dict of the fault fields to change.
        Changing ``faults`` restarts the fault draws from ``faults.seed``.
        """
        from .config import RUNTIME_FIXED

        fixed = sorted(RUNTIME_FIXED & set(changes))
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: fixed at start-up; start another server")
        new = self._config.updated(changes)  # validate here first: a clear local error
        body = new.secret_dict()
        self._call("POST", "/_local/config", {k: body[k] for k in changes})
        self._config = new
        return new


def _harness_config(config: ServerConfig, controls: bool) -> ServerConfig:
    """``config`` with what the harness needs: a token, and (with ``controls``) the controls."""
    fill: dict[str, Any] = {}
    if not config.public and not config.api_tokens():
        fill["token"] = "local-" + secrets.token_urlsafe(24)
    if controls and not config.control_routes:
        fill["control_routes"] = True
        if config.admin_token is None:
            fill["admin_token"] = "admin-" + secrets.token_urlsafe(24)
    return config.updated(fill) if fill else config
