"""`make dev` (scripts/dev.py) with real processes: it stops cleanly, every time.

One ``DAGSTER_HOME`` of the test's own (the user's, which dev.py must honour) serves two
sessions of the script, stopped differently: a Ctrl-C, and a double Ctrl-C (the second
while the first stop is under way). A Ctrl-C is SIGINT to the script's process group, as
a terminal sends it. SIGTERM and a second signal during a slow stop are checked on the
script's signal handling itself, in a child process, in a few seconds. After each stop, every process that
was running under the script (the local server, SeaweedFS, ``dagster dev`` and its
webserver, daemon and code servers) is gone and the UI's port is free.

Between sessions the instance remembers materializations: the first session
materializes ``product_images`` for a product, and the second materializes
``product_watercolor`` from it, which loads those images from the restarted SeaweedFS.
Only processes this test started are signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.dagster_dev import free_port

REPO = Path(__file__).resolve().parent.parent
PARTITION = "desk-lamp"
READY_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 420.0

_LOCATIONS = "query { workspaceOrError { ... on Workspace { locationEntries { name } } } }"
_LAUNCH = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}
"""
_RUN = "query ($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"


class DevSession:
    """``python scripts/dev.py`` in a session of its own, its output collected."""

    def __init__(self, home: Path, port: int) -> None:
        env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "dev.py"), "--port", str(port)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Dagster UI: " not in self.output:
            assert self.process.poll() is None, f"dev.py exited early:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, (
                f"no UI after {READY_TIMEOUT_S}s:\n{self.output[-4000:]}"
            )
            time.sleep(0.5)

    def ctrl_c(self) -> None:
        """SIGINT to the script's process group, as a terminal sends it."""
        os.killpg(self.process.pid, signal.SIGINT)

    def wait(self) -> int:
        code = self.process.wait(timeout=STOP_TIMEOUT_S)
        self._reader.join(timeout=10)
        return code

    def kill_leftovers(self, pids: dict[int, str]) -> None:
        """After a failed test: SIGKILL what this test's session started and left behind."""
        for pid, start in pids.items():
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return text[text.rindex(")") + 2 :].split()


def _descendants(root: int) -> dict[int, str]:
    """Every live process under ``root`` now, with its start time (so a reused pid is told apart)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        starts[int(entry.name)] = fields[19]
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child in starts:
                found[child] = starts[child]
                todo.append(child)
    return found


def _alive(pid: int, start: str) -> bool:
    fields = _stat(pid)
    # Gone, reused by another process, or a zombie (dead, waiting to be reaped): not running.
    return fields is not None and fields[19] == start and fields[0] != "Z"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _graphql(url: str, query: str, **variables: Any) -> dict[str, Any]:
    answer = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=60)
    answer.raise_for_status()
    body: dict[str, Any] = answer.json()
    assert "errors" not in body, body
    data: dict[str, Any] = body["data"]
    return data


def _materialize(url: str, assets: list[str]) -> str:
    """Launch ``assets`` for the test's partition from the UI's GraphQL API; the run's status."""
    (location,) = _graphql(url, _LOCATIONS)["workspaceOrError"]["locationEntries"]
    params = {
        "selector": {
            "repositoryLocationName": location["name"],
            "repositoryName": "__repository__",
            "jobName": "product_images_job",
            "assetSelection": [{"path": [a]} for a in assets],
        },
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": PARTITION}]},
        "runConfigData": {},
    }
    launched = _graphql(url, _LAUNCH, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        status: str = _graphql(url, _RUN, id=run_id)["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        assert time.monotonic() < deadline, f"run {run_id} still {status}"
        time.sleep(2)


@pytest.fixture
def dagster_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "my_dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    yield home


def _session(
    home: Path, stop: list[int], work: list[str] | None = None
) -> tuple[DevSession, dict[int, str], str | None]:
    """One session: start, wait for the UI, optionally materialize, stop with ``stop`` signals."""
    session = DevSession(home, free_port())
    pids: dict[int, str] = {}
    try:
        session.wait_until_ready()
        status = _materialize(session.url, work) if work else None
        pids = _descendants(session.process.pid)
        for i, sig in enumerate(stop):
            if i:
                time.sleep(0.5)  # the second signal lands while the first stop is under way
            if sig == signal.SIGINT:
                session.ctrl_c()
            else:
                session.process.send_signal(sig)
        code = session.wait()
    except BaseException:
        session.process.kill()
        session.kill_leftovers(pids or _descendants(session.process.pid))
        raise
    assert code == 0, session.output[-4000:]
    leftovers = {pid: start for pid, start in pids.items() if _alive(pid, start)}
    if leftovers:
        session.kill_leftovers(leftovers)
    assert not leftovers, f"still running after the stop: {leftovers}\n{session.output[-4000:]}"
    assert _port_is_free(session.port), f"port {session.port} still taken"
    return session, pids, status


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_make_dev_stops_cleanly_every_time_and_keeps_its_instance(dagster_home: Path) -> None:
    # 1. A Ctrl-C. The instance, and SeaweedFS's data beside it, live in our DAGSTER_HOME.
    first, pids, status = _session(
        dagster_home, [signal.SIGINT], work=["prompt_catalogue", "product_images"]
    )
    assert status == "SUCCESS", first.output[-4000:]
    # The local server, SeaweedFS and dagster dev (webserver, daemon, code server) were up.
    assert len(pids) >= 5, pids
    assert f"instance in {dagster_home}" in first.output
    assert (dagster_home / "s3").is_dir()
    assert (dagster_home / "history" / "runs.db").is_file()

    # 2. A double Ctrl-C: the second one does not cut the stop short. After the restart,
    #    product_watercolor loads the product shot the first session stored.
    second, _, status = _session(
        dagster_home, [signal.SIGINT, signal.SIGINT], work=["product_watercolor"]
    )
    assert status == "SUCCESS", second.output[-4000:]
    assert "still stopping" in second.output

    # SIGTERM (a CI timeout, `kill`) followed by more signals is the fast test below.
    for session in (first, second):
        assert "stopped SeaweedFS" in session.output
        assert "stopped the OctoAI-compatible server" in session.output
        assert session.output.rstrip().endswith("stopped")


# ---- the signal handling itself, in a child process ---------------------------------------

_STOPPER = """
import sys, time
sys.path.insert(0, {scripts!r})
from _services import Shutdown

shutdown = Shutdown(interrupt={interrupt}).install()
try:
    print("ready", flush=True)  # inside the try: a signal right after it is handled there
    if {interrupt}:
        time.sleep(60)  # the work a first signal interrupts
    else:
        shutdown.requested.wait(60)
finally:
    # A stop that takes a while, as stopping dagster dev does (SIGTERM, a grace, SIGKILL).
    print("stopping", flush=True)
    for _ in range(30):
        time.sleep(0.1)
    print("stop finished", flush=True)
"""


@pytest.mark.parametrize("interrupt", [False, True], ids=["make dev", "make demo"])
def test_a_second_signal_does_not_cut_the_stop_short(interrupt: bool) -> None:
    code = _STOPPER.format(scripts=str(REPO / "scripts"), interrupt=interrupt)
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        os.killpg(child.pid, signal.SIGINT)
        assert child.stdout.readline().strip().endswith("stopping everything that was started")
        assert child.stdout.readline().strip() == "stopping"
        # Ctrl-C again, and SIGTERM, while the stop is under way.
        os.killpg(child.pid, signal.SIGINT)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert "still stopping" in out
    assert "stop finished" in out, out
