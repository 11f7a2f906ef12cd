"""The child-process helpers, on real processes: signals, grace periods, process groups."""

from __future__ import annotations

import doctest
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dagster_octoai import _process
from dagster_octoai._process import (
    PortClash,
    StartStopContext,
    kill_pid,
    log_tail,
    start_retrying_port_clash,
    stop_process,
    stop_process_group,
    wait_until_ready,
)

# A child that ignores SIGTERM (as SeaweedFS does for a while), says so, then sleeps.
_IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)
# A group leader that ignores SIGTERM and starts a grandchild that does too; it prints
# the grandchild's pid once both ignore it.
_GROUP_LEADER = (
    "import signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    f"child = subprocess.Popen([sys.executable, '-c', {_IGNORES_SIGTERM!r}], "
    "stdout=subprocess.PIPE, text=True); child.stdout.readline(); "
    "print(child.pid, flush=True); child.wait()"
)


def _spawn(code: str, *, start_new_session: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=start_new_session,
    )


def _alive(pid: int) -> bool:
    """Running, not a zombie (this box's pid 1 may be slow to reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.fixture
def cleanup() -> Iterator[list[subprocess.Popen[str]]]:
    """Children a failing test may leave: SIGKILLed by their own Popen afterwards."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def test_stop_process_sigkills_a_child_that_ignores_sigterm_after_the_grace(
    cleanup: list[subprocess.Popen[str]],
) -> None:
    proc = _spawn(_IGNORES_SIGTERM)
    cleanup.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    started = time.monotonic()
    stop_process(proc, grace_s=0.3, reap_s=10)

    assert proc.returncode == -signal.SIGKILL
    # It was given the whole grace to exit on SIGTERM before being killed.
    assert time.monotonic() - started >= 0.3


def test_stop_process_lets_a_cooperative_child_exit_on_sigterm(
    cleanup: list[subprocess.Popen[str]],
) -> None:
    proc = _spawn("import time; print('ready', flush=True); time.sleep(60)")
    cleanup.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    stop_process(proc, grace_s=10, reap_s=10)

    assert proc.returncode == -signal.SIGTERM


def test_stop_process_leaves_an_exited_child_alone() -> None:
    proc = _spawn("raise SystemExit(7)")
    proc.wait(timeout=30)

    stop_process(proc, grace_s=0.1, reap_s=0.1)

    assert proc.returncode == 7


def test_stop_process_group_kills_the_whole_group_and_nothing_else(
    cleanup: list[subprocess.Popen[str]],
) -> None:
    bystander = _spawn("import time; print('ready', flush=True); time.sleep(60)")
    cleanup.append(bystander)
    leader = _spawn(_GROUP_LEADER, start_new_session=True)
    cleanup.append(leader)
    assert leader.stdout is not None and bystander.stdout is not None
    grandchild = int(leader.stdout.readline())
    assert bystander.stdout.readline().strip() == "ready"
    assert os.getpgid(grandchild) == leader.pid

    try:
        stop_process_group(leader, grace_s=0.3)

        assert leader.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(grandchild)
        # A process outside the group, though ours too, is not signalled.
        assert bystander.poll() is None
    finally:
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_kill_pid_kills_a_process_known_only_by_its_pid(
    cleanup: list[subprocess.Popen[str]],
) -> None:
    # The launcher starts a daemon and exits, as pg_ctl does with the postmaster.
    launcher = _spawn(
        "import subprocess, sys; "
        "d = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "start_new_session=True); print(d.pid, flush=True)"
    )
    cleanup.append(launcher)
    assert launcher.stdout is not None
    daemon = int(launcher.stdout.readline())
    launcher.wait(timeout=30)
    try:
        assert _alive(daemon)

        kill_pid(daemon, wait_s=5)

        deadline = time.monotonic() + 10
        while _alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(daemon)
    finally:
        if _alive(daemon):
            os.kill(daemon, signal.SIGKILL)


def test_kill_pid_of_a_gone_process_returns_at_once() -> None:
    proc = _spawn("pass")
    proc.wait(timeout=30)  # reaped: the pid names no process now (until it is reused)

    kill_pid(proc.pid, wait_s=5)


def test_wait_until_ready_raises_the_timeout_error_with_the_last_reason() -> None:
    calls: list[int] = []

    def probe() -> str:
        calls.append(1)
        return f"not yet ({len(calls)})"

    with pytest.raises(TimeoutError) as raised:
        wait_until_ready(probe, timeout_s=0.2, interval_s=0.01, on_timeout=TimeoutError)
    assert len(calls) > 1
    assert str(raised.value) == f"not yet ({len(calls)})"


def test_wait_until_ready_gives_up_at_once_when_the_probe_raises() -> None:
    calls: list[int] = []

    def probe() -> str | None:
        calls.append(1)
        raise RuntimeError("the child exited")

    with pytest.raises(RuntimeError, match="the child exited"):
        wait_until_ready(probe, timeout_s=30, interval_s=0.01, on_timeout=TimeoutError)
    assert len(calls) == 1


def test_start_retrying_port_clash_gives_up_after_the_attempts() -> None:
    cleanups: list[int] = []

    def start_once() -> None:
        raise PortClash(f"port taken ({len(cleanups)})")

    with pytest.raises(RuntimeError, match=r"^demo did not start: port taken \(2\)$"):
        start_retrying_port_clash(start_once, lambda: cleanups.append(1), what="demo")
    assert len(cleanups) == 3


def test_start_retrying_port_clash_does_not_retry_other_errors() -> None:
    attempts: list[int] = []

    def start_once() -> None:
        attempts.append(1)
        raise FileNotFoundError("no binary")

    with pytest.raises(FileNotFoundError):
        start_retrying_port_clash(start_once, lambda: None, what="demo")
    assert len(attempts) == 1


def test_start_stop_context_stops_when_the_body_raises() -> None:
    events: list[str] = []

    class Service(StartStopContext):
        def start(self) -> None:
            events.append("start")

        def stop(self) -> None:
            events.append("stop")

    with pytest.raises(ValueError), Service() as service:
        assert isinstance(service, Service)
        raise ValueError("boom")
    assert events == ["start", "stop"]


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(30)) + b"bad \xff byte\n")

    assert log_tail(log, lines=2) == "line 29\nbad \ufffd byte"
    assert log_tail(tmp_path / "missing.log") == ""


def test_doctests() -> None:
    result = doctest.testmod(_process, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_imports_no_heavy_library() -> None:
    # The local server's child process imports runner, which imports this module.
    code = (
        "import sys, dagster_octoai._process, dagster_octoai.server.runner; "
        "print(sorted(m for m in ('dagster', 'httpx', 'boto3') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
