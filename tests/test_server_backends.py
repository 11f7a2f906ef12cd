"""The backend seam: the HTTP layer is the same whatever renders the images.

A recording backend served over real HTTP (uvicorn) shows what the layer hands a
backend (the validated request and the seeds it chose), that a backend's problems
are 422s before anything queues, that a backend with devices sets the replica
count, and that the backend is fixed at start-up.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from dagster_octoai.api.models import ImageGenerationRequest
from dagster_octoai.server import ServerConfig, create_app
from dagster_octoai.server.backends import (
    Backend,
    BackendError,
    Problem,
    RenderedImage,
    load_backend,
)
from dagster_octoai.server.backends.placeholder import PlaceholderBackend
from dagster_octoai.server.runner import _uvicorn_server, bind_socket

pytestmark = pytest.mark.timeout(60)

TOKEN = "seam-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The control routes answer only their own admin token (issue 17).
ADMIN_AUTH = {"Authorization": "Bearer seam-admin-token"}


class RecordingBackend:
    """Renders flat grey PNGs, records every call, refuses the prompt 'refuse me'."""

    name = "recording"

    def __init__(self, replicas: int | None = None, hold_s: float = 0.0) -> None:
        self._replicas = replicas
        self.hold_s = hold_s
        self.calls: list[tuple[ImageGenerationRequest, list[int]]] = []
        self.active = 0
        self.active_max = 0
        self.closed = False
        self._lock = threading.Lock()

    @property
    def replicas(self) -> int | None:
        return self._replicas

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "devices": ["test:0"]}

    def check(self, request: ImageGenerationRequest) -> list[Problem]:
        if request.prompt == "refuse me":
            return [(("checkpoint",), "checkpoint: 'nope' is not on this server; it has: a, b")]
        return []

    def render(
        self, request: ImageGenerationRequest, seeds: list[int], config: ServerConfig
    ) -> list[RenderedImage]:
        with self._lock:
            self.calls.append((request, seeds))
            self.active += 1
            self.active_max = max(self.active_max, self.active)
        try:
            time.sleep(self.hold_s)
            out = []
            for seed in seeds:
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (seed % 256,) * 3).save(buf, format="PNG")
                out.append(RenderedImage(buf.getvalue(), seed, False, 0.0))
            return out
        finally:
            with self._lock:
                self.active -= 1

    def close(self) -> None:
        self.closed = True


class _Served:
    def __init__(self, url: str, backend: RecordingBackend) -> None:
        self.url = url
        self.backend = backend


def _serve(backend: RecordingBackend, **config: Any) -> Iterator[_Served]:
    cfg = ServerConfig(token=TOKEN, control_routes=True, admin_token="seam-admin-token", **config)
    sock = bind_socket("127.0.0.1", 0)
    server = _uvicorn_server(cfg, "warning", create_app(cfg, backend=backend))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        yield _Served(f"http://127.0.0.1:{sock.getsockname()[1]}", backend)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def served() -> Iterator[_Served]:
    yield from _serve(RecordingBackend())


def test_the_recording_backend_satisfies_the_protocol() -> None:
    assert isinstance(RecordingBackend(), Backend)
    assert isinstance(PlaceholderBackend(), Backend)


def test_the_backend_renders_what_the_layer_validated_with_its_seeds(served: _Served) -> None:
    r = httpx.post(
        f"{served.url}/generate/sd",
        json={"prompt": "a fox", "num_images": 3, "seed": 41, "steps": 4},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    assert [im["seed"] for im in r.json()["images"]] == [41, 42, 43]
    (request, seeds), *_ = served.backend.calls
    assert seeds == [41, 42, 43]
    assert (request.engine.value, request.prompt, request.steps) == ("sd", "a fox", 4)


def test_backend_problems_are_422s_before_anything_is_rendered(served: _Served) -> None:
    r = httpx.post(f"{served.url}/generate/sdxl", json={"prompt": "refuse me"}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["detail"] == [
        {
            "loc": ["body", "checkpoint"],
            "msg": "checkpoint: 'nope' is not on this server; it has: a, b",
            "type": "value_error",
        }
    ]
    # Async submissions are checked the same way, before a job exists.
    r = httpx.post(
        f"{served.url}/generate/sdxl",
        json={"prompt": "refuse me"},
        headers={**AUTH, "X-OctoAI-Async": "1"},
    )
    assert r.status_code == 422
    assert served.backend.calls == []
    stats = httpx.get(f"{served.url}/_local/stats", headers=ADMIN_AUTH).json()
    assert stats["paid_generations"] == 0 and stats["validation_errors"] == 2


def test_describe_is_served_and_needs_the_token(served: _Served) -> None:
    assert httpx.get(f"{served.url}/_local/backend").status_code == 401
    assert httpx.get(f"{served.url}/_local/backend", headers=AUTH).status_code == 401
    r = httpx.get(f"{served.url}/_local/backend", headers=ADMIN_AUTH)
    assert r.json() == {"backend": "recording", "devices": ["test:0"]}


def test_the_backend_is_fixed_at_start_up(served: _Served) -> None:
    r = httpx.post(
        f"{served.url}/_local/config",
        json={"backend": "diffusers", "replicas": 2},
        headers=ADMIN_AUTH,
    )
    assert r.status_code == 422
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "backend"]]
    assert "restart the server" in r.json()["detail"][0]["msg"]
    config = httpx.get(f"{served.url}/_local/config", headers=ADMIN_AUTH).json()
    assert config["backend"] == "placeholder" and config["replicas"] == 4


def test_a_backend_with_devices_sets_the_replica_count() -> None:
    # Four replicas configured, but the backend has one device: one render at a time.
    backend = RecordingBackend(replicas=1, hold_s=0.2)
    for served in _serve(backend, replicas=4):
        with httpx.Client(headers=AUTH, timeout=30) as client:
            threads = [
                threading.Thread(
                    target=client.post,
                    args=(f"{served.url}/generate/sd",),
                    kwargs={"json": {"prompt": f"p{i}"}},
                )
                for i in range(3)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stats = client.get(f"{served.url}/_local/stats", headers=ADMIN_AUTH).json()
    assert len(backend.calls) == 3
    assert backend.active_max == 1
    assert stats["in_flight_max"] == 1 and stats["queued_max"] >= 1
    assert backend.closed


def test_load_backend_names_and_config_rules() -> None:
    assert load_backend(ServerConfig()).name == "placeholder"
    with pytest.raises(ValueError, match="models: the diffusers backend needs a model directory"):
        ServerConfig(backend="diffusers")
    with pytest.raises(ValueError, match="'gpu0' is not a device; allowed: cpu, cuda, cuda:N"):
        ServerConfig(device=("gpu0",))
    # A wrong model directory fails at once, before torch is imported.
    with pytest.raises(BackendError, match="not a model directory"):
        load_backend(ServerConfig(backend="diffusers", models="/nonexistent/models"))


def test_a_placeholder_server_never_imports_torch() -> None:
    code = (
        "import sys, httpx\n"
        "from dagster_octoai.server import LocalOctoAIServer, ServerConfig\n"
        "with LocalOctoAIServer(ServerConfig(token='t')) as srv:\n"
        "    r = httpx.post(srv.url + '/generate/sd', json={'prompt': 'x'},\n"
        "                   headers={'Authorization': 'Bearer t'})\n"
        "    assert r.status_code == 200, r.text\n"
        "bad = sorted(m for m in ('torch', 'diffusers', 'transformers', 'cv2') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
