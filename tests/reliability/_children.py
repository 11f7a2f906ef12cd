"""Child processes that die by SIGKILL at a chosen point, started fast from a fork server.

A fresh ``python`` that imports Dagster takes seconds on a busy 2-core box; the
restart tests start a dozen such processes. They come from a ``forkserver`` that
imported Dagster, boto3 and this package once: each child is a fork of that clean,
single-threaded process (not of the test process, whose server and pool threads a
fork would copy half-way). A child still has its own memory, file descriptors and
environment, and ``SIGKILL`` ends it like any process.

Each child writes its output (stdout, stderr, Dagster's logs) to a log file the test
scans for the token, and its result as JSON to another file.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PRELOAD = [
    "dagster",
    "boto3",
    "httpx",
    # Imported lazily by the first instance and the first run; seconds on a busy box.
    "sqlalchemy",
    "alembic",
    "dagster._core.instance.factory",
    "dagster._core.storage.runs.sqlite.sqlite_run_storage",
    "dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log",
    "dagster._core.storage.event_log.sqlite.sqlite_event_log",
    "dagster._core.storage.schedules.sqlite.sqlite_schedule_storage",
    "dagster._core.storage.local_compute_log_manager",
    "dagster._core.execution.execute_in_process",
    "dagster._core.remote_representation",
    "PIL.Image",
    "dagster_octoai.async_assets",
    "dagster_octoai.io_managers",
    "dagster_octoai.sensors",
    "reliability._sensor_support",
    "reliability._crash_driver",
]
_context: Any = None

#: Exit code of a child whose crash point was never reached (the test fails on it).
NOT_REACHED = 3


def _mp() -> Any:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def run_child(target: Callable[..., None], *args: Any, timeout: float = 180.0) -> int:
    """Run ``target(*args)`` in a forked child; its exit code (``-9`` when SIGKILLed)."""
    proc = _mp().Process(target=target, args=args, daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join(10)
        raise TimeoutError(f"child {target.__name__} still running after {timeout} s")
    code: int = proc.exitcode
    return code


def redirect_output(log_path: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def die() -> None:
    """SIGKILL this process: no clean-up, no flush, no ``finally``."""
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(
    owner: Any,
    name: str,
    *,
    nth: int = 1,
    before: bool = False,
    when: Callable[..., bool] = lambda *a, **k: True,
) -> None:
    """Wrap ``owner.name`` so the process dies the ``nth`` time a matching call starts or ends."""
    original = getattr(owner, name)
    seen = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        matches = when(*args, **kwargs)
        if matches and before:
            seen += 1
            if seen == nth:
                die()
        result = original(*args, **kwargs)
        if matches and not before:
            seen += 1
            if seen == nth:
                die()
        return result

    setattr(owner, name, wrapper)


def write_result(path: str, data: Any) -> None:
    Path(path).write_text(json.dumps(data))
