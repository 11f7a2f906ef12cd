"""Starting, waiting for and stopping the child processes this package runs.

One place for what the local server's process mode (``server/runner.py``) and the test
helpers (SeaweedFS, PostgreSQL, ``dagster dev``) all do with a child: wait until it
serves, retry a start that lost its port, and stop it for sure. Every signal goes to a
pid this process started (or to the process group such a child leads), never to a
process found by name.

Standard library only: the local server's child process imports ``runner``, and must
not pay for Dagster, httpx or boto3 on every start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

__all__ = [
    "PortClash",
    "StartStopContext",
    "kill_pid",
    "log_tail",
    "start_retrying_port_clash",
    "stop_process",
    "stop_process_group",
    "wait_until_ready",
]


class _Startable(Protocol):
    def start(self) -> object: ...

    def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Startable)


class StartStopContext:
    """Mixin: ``with thing:`` calls ``thing.start()`` on entry and ``thing.stop()`` on exit.

    The class mixing it in defines ``start()`` and ``stop()``; ``stop()`` runs even when
    the body raises, or when ``start()`` itself does (a Ctrl-C while a child starts), so
    no child outlives the ``with`` block.

    Examples:
        >>> class Noisy(StartStopContext):
        ...     def start(self) -> None:
        ...         print("start")
        ...     def stop(self) -> None:
        ...         print("stop")
        >>> with Noisy() as thing:
        ...     print(type(thing).__name__)
        start
        Noisy
        stop
    """

    def __enter__(self: _S) -> _S:
        try:
            self.start()
        except BaseException:
            # A start cut short (an error, a Ctrl-C) may have a child running already.
            self.stop()
            raise
        return self

    def __exit__(
        self: _Startable,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class PortClash(RuntimeError):
    """A free port picked for a child was taken by someone else before the child bound it."""


def start_retrying_port_clash(
    start_once: Callable[[], None],
    cleanup: Callable[[], None],
    *,
    what: str,
    attempts: int = 3,
) -> None:
    """Call ``start_once`` until it does not raise :class:`PortClash`, ``attempts`` times at most.

    A port is picked free (bind to port 0, close) and handed to a child that binds it
    later; another process may take it in between. That start fails, is cleaned up with
    ``cleanup`` and is tried again, on new ports.

    Raises:
        RuntimeError: every attempt clashed; names ``what`` and says the last clash.

    Examples:
        >>> tries = []
        >>> def start_once() -> None:
        ...     tries.append(1)
        ...     if len(tries) < 2:
        ...         raise PortClash("address already in use")
        >>> start_retrying_port_clash(start_once, lambda: None, what="demo")
        >>> len(tries)
        2
    """
    last = ""
    for _ in range(attempts):
        try:
            start_once()
            return
        except PortClash as exc:
            last = str(exc)
            cleanup()
    raise RuntimeError(f"{what} did not start: {last}")


def wait_until_ready(
    probe: Callable[[], str | None],
    *,
    timeout_s: float,
    interval_s: float,
    on_timeout: Callable[[str], BaseException],
) -> None:
    """Call ``probe`` every ``interval_s`` seconds until it answers ``None`` (ready).

    ``probe`` answers ``None`` when the child serves, or why it does not yet (kept for
    the timeout's message); it raises to give up at once, e.g. when the child has
    exited, since a dead child never becomes ready.

    Raises:
        BaseException: ``on_timeout(last reason)`` once ``timeout_s`` has passed.

    Examples:
        >>> answers = iter(["starting", None])
        >>> wait_until_ready(
        ...     lambda: next(answers), timeout_s=5, interval_s=0, on_timeout=TimeoutError
        ... )
    """
    deadline = time.monotonic() + timeout_s
    reason = "no answer yet"
    while time.monotonic() < deadline:
        not_ready = probe()
        if not_ready is None:
            return
        reason = not_ready
        time.sleep(interval_s)
    raise on_timeout(reason)


def log_tail(path: Path | None, lines: int = 20) -> str:
    """The last ``lines`` lines of a child's log file, for an error message ('' if none).

    Examples:
        >>> log_tail(None)
        ''
    """
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_process(proc: subprocess.Popen[Any], *, grace_s: float, reap_s: float) -> None:
    """Stop a child we started: SIGTERM, and SIGKILL if it is still alive after ``grace_s``.

    Some children ignore SIGTERM for a while (SeaweedFS does), so the SIGKILL is what
    makes the stop certain. Both signals go through ``proc``, which signals nothing once
    the child has been reaped: a recycled pid is never hit.

    Raises:
        subprocess.TimeoutExpired: the child outlived SIGKILL by ``reap_s`` seconds.

    Examples:
        >>> import sys
        >>> child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        >>> stop_process(child, grace_s=5, reap_s=5)
        >>> child.returncode == -signal.SIGTERM
        True
    """
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=reap_s)


def stop_process_group(proc: subprocess.Popen[Any], *, grace_s: float) -> None:
    """Stop a child started with ``start_new_session=True`` and everything in its group.

    SIGTERM goes to the whole process group, then SIGKILL once the group is gone or
    ``grace_s`` has passed. For a child that ignores signals from a non-interactive shell
    (``dagster dev`` does) and whose own children (webserver, daemon, code server) may
    outlive it. The group's id is ``proc.pid``: ``start_new_session`` made the child the
    leader of a new group, so only processes descended from it are in the group.

    Raises:
        subprocess.TimeoutExpired: the child outlived SIGKILL by ``grace_s`` seconds.
    """
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    # The group's members may outlive its leader: wait for all of them.
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid)):
        time.sleep(0.1)
    # Only while the group still has members: once it is empty and its leader reaped,
    # the id may be reused by an unrelated group.
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
    proc.wait(timeout=grace_s)


def kill_pid(pid: int, *, wait_s: float) -> None:
    """SIGKILL ``pid`` if it is still alive, and wait up to ``wait_s`` seconds for it to go.

    For a process this one started but does not hold as a child: a daemon that its
    launcher forked off and that wrote its pid for us (PostgreSQL's postmaster, started
    by ``pg_ctl``). A pid that is gone, or not ours to signal, is left alone.
    """
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
