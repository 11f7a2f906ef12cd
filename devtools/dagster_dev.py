"""Run ``dagster dev`` for a test or a demo, and stop it for sure afterwards.

``dagster dev`` started from a non-interactive shell ignores SIGINT and SIGTERM, and it
spawns the webserver, the daemon and a code server as children. So the process is started
in its own session (``start_new_session=True``) and stopped by signalling its whole process
group: SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from dagster_octoai._process import StartStopContext, stop_process_group, wait_until_ready

__all__ = ["DagsterDev", "DagsterDevError", "free_port"]

_WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
        }
      }
    }
  }
}
"""


class DagsterDevError(RuntimeError):
    """Raised when ``dagster dev`` exits early, or its UI or code location does not come up in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the OS picks it via port 0).

    Examples:
        >>> 1024 <= free_port() <= 65535
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class DagsterDev(StartStopContext):
    """``dagster dev`` on a code location, in a throwaway ``DAGSTER_HOME`` with telemetry off.

    Use it as a context manager: on entry it starts ``dagster dev`` on a free loopback port and
    waits until the UI answers and every code location has loaded; on exit it kills the process
    group and removes the temporary home. The combined output goes to ``log_path`` so a failing
    test can show it.

    Args:
        module: Python module holding a ``Definitions`` (``dagster dev -m``).
        python_file: Alternatively, a file holding a ``Definitions`` (``dagster dev -f``).
        env: Extra environment variables for ``dagster dev`` and the code it loads.
        cwd: Working directory for the process (so ``module`` can be imported from it).
        port: The UI's port; default: a free one.
        dagster_home: Keep the instance (runs, event logs) in this directory instead of
            a temporary one that is removed on exit. Its ``dagster.yaml`` is written only
            if missing, with telemetry off.
        echo_output: Let ``dagster dev`` write to this process's stdout and stderr (an
            interactive ``make dev``) instead of the log file.
        startup_timeout_s: How long to wait for the UI and the code location.
        stop_grace_s: How long SIGTERM gets before SIGKILL.
        abort: Set it (e.g. from a signal handler) to give up waiting for the UI: the start
            then raises :class:`DagsterDevError` after stopping what it started.

    Examples:
        >>> with DagsterDev(module="example_project.definitions") as dev:  # doctest: +SKIP
        ...     print(dev.url)
        http://127.0.0.1:...
    """

    def __init__(
        self,
        *,
        module: str | None = None,
        python_file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        port: int | None = None,
        dagster_home: str | os.PathLike[str] | None = None,
        echo_output: bool = False,
        startup_timeout_s: float = 180.0,
        stop_grace_s: float = 10.0,
        abort: threading.Event | None = None,
    ) -> None:
        if (module is None) == (python_file is None):
            raise ValueError("DagsterDev needs exactly one of `module` or `python_file`.")
        self._target: list[str] = (
            ["-m", module] if module is not None else ["-f", os.fspath(python_file or "")]
        )
        self._env = dict(env or {})
        self._cwd = os.fspath(cwd) if cwd is not None else None
        self._fixed_port = port
        self._fixed_home = Path(dagster_home).resolve() if dagster_home is not None else None
        self._echo_output = echo_output
        self._startup_timeout_s = startup_timeout_s
        self._stop_grace_s = stop_grace_s
        self._abort = abort
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the Dagster UI, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    @property
    def dagster_home(self) -> Path:
        """The temporary ``DAGSTER_HOME`` (instance storage: runs, event logs)."""
        return self._fixed_home or self._require_tmp() / "home"

    @property
    def log_path(self) -> Path:
        """File holding ``dagster dev``'s combined stdout and stderr."""
        return self._require_tmp() / "dagster-dev.log"

    def log_tail(self, max_chars: int = 6000) -> str:
        """The end of ``dagster dev``'s output, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return ""

    def start(self) -> None:
        """Start ``dagster dev`` and wait until its UI answers with every code location loaded."""
        if self._process is not None:
            raise DagsterDevError("dagster dev is already running")
        self._tmp = Path(tempfile.mkdtemp(prefix="dagster-dev-"))
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        settings = self.dagster_home / "dagster.yaml"
        if not settings.exists():
            settings.write_text("telemetry:\n  enabled: false\n")
        self.port = self._fixed_port or free_port(self.host)
        env = {**os.environ, **self._env, "DAGSTER_HOME": str(self.dagster_home)}
        command: Sequence[str] = [
            sys.executable,
            "-m",
            "dagster",
            "dev",
            *self._target,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self._cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=None if self._echo_output else log,
                stderr=None if self._echo_output else subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as http:
            wait_until_ready(
                lambda: self._problem(http),
                timeout_s=self._startup_timeout_s,
                interval_s=0.5,
                on_timeout=lambda problem: DagsterDevError(
                    f"dagster dev did not become ready within {self._startup_timeout_s:.0f}s "
                    f"({problem}). Output:\n{self.log_tail()}"
                ),
            )

    def _problem(self, http: httpx.Client) -> str | None:
        """Why ``dagster dev`` is not ready yet, or None; raises if it cannot become ready."""
        assert self._process is not None
        if self._abort is not None and self._abort.is_set():
            raise DagsterDevError("stop requested while dagster dev was starting")
        if self._process.poll() is not None:
            raise DagsterDevError(
                f"dagster dev exited with code {self._process.returncode} before its UI "
                f"came up. Output:\n{self.log_tail()}"
            )
        try:
            answer = http.post("/graphql", json={"query": _WORKSPACE_QUERY})
            if answer.status_code != 200:
                return f"HTTP {answer.status_code} from /graphql"
            return _workspace_problem(answer.json())
        except (httpx.TransportError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"

    def wait(self) -> int:
        """Block until ``dagster dev`` exits (e.g. the UI process dies); its exit code."""
        if self._process is None:
            raise DagsterDevError("dagster dev is not running")
        return self._process.wait()

    def wait_or_stop(self, stop: threading.Event, poll_s: float = 0.5) -> int | None:
        """Block until ``dagster dev`` exits (its exit code) or ``stop`` is set (``None``)."""
        if self._process is None:
            raise DagsterDevError("dagster dev is not running")
        while not stop.wait(poll_s):
            code = self._process.poll()
            if code is not None:
                return code
        return None

    def stop(self) -> None:
        """Kill ``dagster dev``'s process group (SIGTERM, then SIGKILL) and remove the temp home."""
        process, self._process = self._process, None
        if process is not None:
            # It ignores signals from a non-interactive shell and its children may outlive it.
            stop_process_group(process, grace_s=self._stop_grace_s)
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def _require_tmp(self) -> Path:
        if self._tmp is None:
            raise DagsterDevError("dagster dev is not running; use it as a context manager")
        return self._tmp


def _workspace_problem(body: object) -> str | None:
    """Why the workspace is not usable yet, or None when every code location has loaded."""
    if not isinstance(body, dict):
        return "unexpected GraphQL answer"
    workspace = (body.get("data") or {}).get("workspaceOrError") or {}
    if workspace.get("__typename") != "Workspace":
        return f"workspace answered {workspace.get('__typename')!r}"
    entries = workspace.get("locationEntries") or []
    if not entries:
        return "no code location yet"
    for entry in entries:
        if entry.get("loadStatus") != "LOADED":
            return f"code location {entry.get('name')!r} is {entry.get('loadStatus')}"
        location = entry.get("locationOrLoadError") or {}
        if location.get("__typename") == "PythonError":
            # A broken code location never heals by waiting: fail now with the reason.
            raise DagsterDevError(
                f"code location {entry.get('name')!r} failed to load: {location.get('message')}"
            )
    return None
