"""The services `make demo` and `make dev` run: the local OctoAI-compatible server and SeaweedFS.

Both are started on free loopback ports and stopped when the ``with`` block ends,
whether it ends normally, by an error or by Ctrl-C. The token is made up here and
handed to the example project through ``OCTOAI_TOKEN``; it is never printed.

Signals (:class:`Shutdown`): the first SIGINT or SIGTERM asks everything to stop; any
later one only says the stop is under way. A second Ctrl-C never cuts the stop short,
so no process started here outlives the script.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
BUCKET = "octoai-example"
PREFIX = "dagster-octoai"

_started = time.monotonic()


def progress(message: str) -> None:
    """One progress line with the seconds since the script started."""
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", flush=True)


@dataclass(frozen=True)
class Services:
    """What was started, and the environment the example project reads."""

    octoai_url: str
    s3_endpoint_url: str
    bucket: str
    env: dict[str, str]

    def apply(self) -> None:
        """Put :attr:`env` into this process's environment (before the project is imported)."""
        os.environ.update(self.env)


class StopRequested(Exception):
    """Raised where a script checks for a stop that a signal asked for."""


class Shutdown:
    """What SIGINT and SIGTERM do to a script that started services.

    The first signal sets :attr:`requested`; with ``interrupt=True`` (the demo, whose work
    runs in the main thread) it also raises ``KeyboardInterrupt`` there, to leave that
    work at once. Every later signal only prints that the stop is under way: raising
    again would cut short the ``with`` blocks that stop the services (and in 2 of about
    10 stops of ``make dev`` it left ``dagster dev`` running, holding its port).
    """

    def __init__(self, *, interrupt: bool) -> None:
        self.interrupt = interrupt
        self.requested = threading.Event()
        self.signals = 0

    def install(self) -> Shutdown:
        """Take over SIGINT and SIGTERM (also when a shell started us with SIGINT ignored)."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def check(self) -> None:
        """Raise :class:`StopRequested` if a signal asked to stop (between start-up steps)."""
        if self.requested.is_set():
            raise StopRequested("stop requested")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            progress(f"still stopping (signal {signum} again): waiting for every process to end")
            return
        progress(f"signal {signum}: stopping everything that was started")
        self.requested.set()
        if self.interrupt:
            raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def running_services(
    output_dir: Path,
    s3_endpoint_url: str | None = None,
    bucket: str = BUCKET,
    *,
    shutdown: Shutdown | None = None,
    s3_data_dir: Path | None = None,
) -> Iterator[Services]:
    """Start the local server (its own process) and SeaweedFS with a bucket; stop both after.

    With ``s3_endpoint_url``, that S3 (credentials from ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY``) and its existing ``bucket`` are used instead of SeaweedFS.
    With ``s3_data_dir``, SeaweedFS keeps its buckets and objects there across restarts
    (``make dev``: next to the instance that records their materializations); otherwise
    they go with it. ``shutdown`` (default: one that interrupts) handles the signals.
    """
    from dagster_octoai.server import LocalOctoAIServer, ServerConfig
    from dagster_octoai.testing.seaweedfs import SeaweedFS

    stop = shutdown or Shutdown(interrupt=True).install()
    token = secrets.token_urlsafe(24)
    progress("starting the local OctoAI-compatible server")
    with ExitStack() as stack:
        stack.callback(progress, "stopped the OctoAI-compatible server")
        server = stack.enter_context(
            LocalOctoAIServer(ServerConfig(token=token, replicas=4), mode="process")
        )
        progress(f"OctoAI-compatible server at {server.url}")
        stop.check()
        if s3_endpoint_url is None:
            kept = f", data kept in {s3_data_dir}" if s3_data_dir is not None else ""
            progress(f"starting SeaweedFS (S3) on loopback{kept}")
            stack.callback(progress, "stopped SeaweedFS")
            s3 = stack.enter_context(SeaweedFS(data_dir=s3_data_dir))
            client = s3.client()
            if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket=bucket)
            s3_endpoint_url = s3.endpoint_url
            credentials = (s3.access_key, s3.secret_key, s3.region)
        else:
            credentials = (
                os.environ["AWS_ACCESS_KEY_ID"],
                os.environ["AWS_SECRET_ACCESS_KEY"],
                os.environ.get("AWS_REGION", "us-east-1"),
            )
        progress(f"S3 at {s3_endpoint_url}, bucket s3://{bucket}")
        stop.check()
        yield Services(
            octoai_url=server.url,
            s3_endpoint_url=s3_endpoint_url,
            bucket=bucket,
            env={
                "OCTOAI_BASE_URL": server.url,
                "OCTOAI_TOKEN": token,
                "EXAMPLE_S3_ENDPOINT_URL": s3_endpoint_url,
                "EXAMPLE_S3_BUCKET": bucket,
                "EXAMPLE_S3_PREFIX": PREFIX,
                "EXAMPLE_OUTPUT_DIR": str(output_dir),
                "AWS_ACCESS_KEY_ID": credentials[0],
                "AWS_SECRET_ACCESS_KEY": credentials[1],
                "AWS_REGION": credentials[2],
            },
        )


def fail(message: str) -> int:
    """Print an error line to stderr; the exit code to return."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1
