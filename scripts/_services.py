"""The services `make demo` and `make dev` run: the local OctoAI-compatible server and SeaweedFS.

Both are started on free loopback ports and stopped when the ``with`` block ends,
whether it ends normally, by an error or by Ctrl-C. The token is made up here and
handed to the example project through ``OCTOAI_TOKEN``; it is never printed.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
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


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # `kill` or a CI timeout: unwind like Ctrl-C, so the services below are stopped.
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def running_services(
    output_dir: Path, s3_endpoint_url: str | None = None, bucket: str = BUCKET
) -> Iterator[Services]:
    """Start the local server (its own process) and SeaweedFS with a bucket; stop both after.

    With ``s3_endpoint_url``, that S3 (credentials from ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY``) and its existing ``bucket`` are used instead of SeaweedFS.
    """
    from dagster_octoai.server import LocalOctoAIServer, ServerConfig
    from dagster_octoai.testing.seaweedfs import SeaweedFS

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    # A shell may start us with SIGINT ignored (a background job); Ctrl-C must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    token = secrets.token_urlsafe(24)
    progress("starting the local OctoAI-compatible server")
    with ExitStack() as stack:
        stack.callback(progress, "stopped the OctoAI-compatible server")
        server = stack.enter_context(
            LocalOctoAIServer(ServerConfig(token=token, replicas=4), mode="process")
        )
        progress(f"OctoAI-compatible server at {server.url}")
        if s3_endpoint_url is None:
            progress("starting SeaweedFS (S3) on loopback")
            stack.callback(progress, "stopped SeaweedFS")
            s3 = stack.enter_context(SeaweedFS())
            s3.client().create_bucket(Bucket=bucket)
            s3_endpoint_url = s3.endpoint_url
            credentials = (s3.access_key, s3.secret_key, s3.region)
        else:
            credentials = (
                os.environ["AWS_ACCESS_KEY_ID"],
                os.environ["AWS_SECRET_ACCESS_KEY"],
                os.environ.get("AWS_REGION", "us-east-1"),
            )
        progress(f"S3 at {s3_endpoint_url}, bucket s3://{bucket}")
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
