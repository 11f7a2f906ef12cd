"""S3 faults: throttling, SeaweedFS stopped mid-run, a missing bucket, bad credentials.

Clear errors, retries where they help, and never a manifest pointing at missing objects.
"""

# No `from __future__ import annotations`: Dagster reads asset annotations at definition time.

import http.client
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from dagster_octoai.api.batch import ImageBatch
from dagster_octoai.api.models import ImageGenerationRequest, ImageGenerationResponse
from dagster_octoai.assets import octoai_image_asset
from dagster_octoai.resources import OctoAIResource
from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.storage import ImageStore, S3Backend
from dagster_octoai.testing.seaweedfs import SeaweedFS
from devtools.secrets import TokenScanner

from ._support import LEAK_TOKEN, Figures, inventory, manifest_problems, s3_io

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class ThrottlingProxy:
    """A loopback HTTP proxy to an S3 endpoint answering a seeded fraction with 503 SlowDown.

    SigV4 signs the Host header, which the proxy forwards unchanged, so SeaweedFS
    checks the same signature the client computed.
    """

    def __init__(self, upstream: str, fraction: float, seed: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        rng = random.Random(seed)
        lock = threading.Lock()
        self.throttled = 0
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads the counts."""

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    throttle = rng.random() < fraction
                    if throttle:
                        proxy.throttled += 1
                    else:
                        proxy.forwarded += 1
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(_SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "ThrottlingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def octoai_server() -> Iterator[LocalOctoAIServer]:
    with LocalOctoAIServer(ServerConfig(token=LEAK_TOKEN, replicas=8)) as srv:
        yield srv


def _resource(server: LocalOctoAIServer) -> OctoAIResource:
    return OctoAIResource(token=LEAK_TOKEN, base_url=server.url, initial_backoff_s=0.01)


PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])


def _asset() -> dg.AssetsDefinition:
    return octoai_image_asset(
        "harbour",
        {"engine": "sd", "steps": 1, "num_images": 8, "seed": list(range(8))},
        prompt_template="a harbour, {partition_key}",
        partitions_def=PARTS,
        io_manager_key="images",
        checks=False,
    )


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    [failure] = result.get_step_failure_events()
    error = failure.step_failure_data.error
    assert error is not None
    parts = []
    while error is not None:
        parts.append(f"{error.cls_name}: {error.message}")
        error = error.cause
    return " | ".join(parts)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_throttling_is_retried_and_every_image_lands(
    octoai_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
    bucket: str,
    figures: Figures,
    scanner: TokenScanner,
) -> None:
    with ThrottlingProxy(seaweedfs.endpoint_url, fraction=0.2, seed=7) as proxy:
        io = s3_io(seaweedfs, bucket, endpoint_url=proxy.url, max_attempts=12)
        resources = {"octoai": _resource(octoai_server), "images": io}
        for key in ("a", "b"):
            result = dg.materialize([_asset()], resources=resources, partition_key=key)
            assert result.success, key
    client = seaweedfs.client()
    inv = inventory(client, bucket, "")
    assert proxy.throttled > 3
    assert len(inv.images) == 16 and len(inv.manifests) == 2
    assert manifest_problems(client, bucket, inv) == []
    leaks, _ = scanner.scan_s3(client, bucket)
    assert leaks == []
    figures.record(
        "S3 throttled (20 % SlowDown)",
        images_requested=16,
        images_persisted=len(inv.images),
        duplicates_in_s3=inv.duplicate_contents,
        s3_throttled_answers=proxy.throttled,
        leaks_found=len(leaks),
    )


@pytest.mark.parametrize("fault", ["missing bucket", "bad credentials"])
def test_a_store_it_cannot_use_fails_clearly_and_writes_nothing(
    fault: str,
    octoai_server: LocalOctoAIServer,
    seaweedfs: SeaweedFS,
    bucket: str,
    figures: Figures,
    scanner: TokenScanner,
) -> None:
    if fault == "missing bucket":
        io = s3_io(seaweedfs, "no-such-bucket-here")
        expected = "does not exist"
    else:
        io = s3_io(seaweedfs, bucket, aws_secret_access_key="wrong-secret-0000")
        expected = "refused the credentials"
    octoai_server.reset_stats()
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [_asset()],
        resources={"octoai": _resource(octoai_server), "images": io},
        partition_key="a",
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    text = _failure_text(result)
    assert "StorageError" in text and expected in text, text
    assert "wrong-secret-0000" not in text
    inv = inventory(seaweedfs.client(), bucket, "")
    assert (inv.images, inv.manifests) == ({}, [])
    leaks, _ = scanner.scan_instance(instance)
    assert leaks == []
    paid = octoai_server.stats()["paid_generations"]
    figures.record(
        f"S3 {fault}",
        images_requested=8,
        images_persisted=0,
        paid_generations=paid,
        error="StorageError",
        leaks_found=len(leaks),
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_seaweedfs_killed_mid_upload_leaves_no_manifest_then_rerun_completes(
    octoai_server: LocalOctoAIServer, tmp_path: Path, figures: Figures
) -> None:
    store = SeaweedFS().start()
    try:
        store.client().create_bucket(Bucket="outage")
        killed: dict[str, Any] = {}
        requests = [
            ImageGenerationRequest.build(
                {
                    "engine": "sd",
                    "prompt": f"storm {i}",
                    "steps": 1,
                    "num_images": 4,
                    "seed": [i * 4 + k for k in range(4)],
                }
            )
            for i in range(4)
        ]

        @dg.asset(io_manager_key="images")
        def storm(context: dg.AssetExecutionContext, octoai: OctoAIResource) -> ImageBatch:
            client = octoai.client  # a lazy batch outlives a get_client() block

            def results() -> Iterator[ImageGenerationResponse]:
                for i, request in enumerate(requests):
                    yield client.generate(request)
                    if i == 1 and not killed:
                        # The store dies while the batch is being uploaded.
                        killed["proc"] = _restart_weed_later(store)

            return ImageBatch(results())

        io = s3_io(store, "outage", max_attempts=2)
        resources = {"octoai": _resource(octoai_server), "images": io}
        first = dg.materialize([storm], resources=resources, raise_on_error=False)
        assert not first.success
        text = _failure_text(first)
        assert "StorageError" in text and ("reach" in text or "S3" in text), text

        # SeaweedFS comes back on the same data: the failed run left no manifest.
        new_proc = killed["proc"]()
        store._proc = new_proc
        _wait_s3(store)
        client = store.client()
        inv = inventory(client, "outage", "")
        assert inv.manifests == []
        second = dg.materialize([storm], resources={**resources, "images": s3_io(store, "outage")})
        assert second.success
        # The failed run's uploads are orphans under its own write id: the clean-up
        # removes them, and leaves exactly what the committed manifest lists.
        orphans = len(inventory(client, "outage", "").images) - 16
        later = datetime.now(timezone.utc) + timedelta(days=3)
        cleaned = ImageStore(S3Backend(client, "outage")).clean_up(now=later)
        assert len(cleaned.removed_keys) == orphans
        inv = inventory(client, "outage", "")
        assert len(inv.images) == 16 and len(inv.manifests) == 1
        assert manifest_problems(client, "outage", inv) == []
        figures.record(
            "SeaweedFS killed mid-upload, restarted, re-run",
            images_requested=16,
            images_persisted=len(inv.images),
            duplicates_in_s3=inv.duplicate_contents,
            manifests_pointing_at_missing_objects=0,
            orphans_removed_by_clean_up=orphans,
            leaks_found=0,
        )
    finally:
        store.stop()


def _restart_weed_later(store: SeaweedFS) -> Any:
    """Kill SeaweedFS now; return a function that starts it again on the same data."""
    pid = store.pid
    assert pid is not None
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    cwd = os.readlink(f"/proc/{pid}/cwd")
    os.kill(pid, signal.SIGKILL)

    def start() -> subprocess.Popen[bytes]:
        if store._proc is not None:
            store._proc.wait(timeout=10)
        return subprocess.Popen(
            [a.decode() for a in argv],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    return start


def _wait_s3(store: SeaweedFS, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            store.client().head_bucket(Bucket="outage")
            return
        except Exception:
            time.sleep(0.2)
    raise TimeoutError(f"SeaweedFS did not come back within {timeout} s")
