"""Endpoints on Ray Serve: a local Ray cluster on loopback, CPU, the placeholder backend.

One cluster for the whole module (Ray is heavy on a 2-core box: 4 logical CPUs, no
dashboard), one endpoint deployed on it: scale to zero, at most 2 generator replicas,
a queue of 3 per frontend, 2 frontends, a 3 s idle timeout. The tests run in file order
and share it: cold start, spread over two replicas, the queue and its 429s, async jobs
across frontends, the official SDK and the package's client, a replica that dies,
scale-down after the idle timeout and up again, the example Dagster job, and the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import httpx
import psutil
import pytest

ray = pytest.importorskip("ray")  # the ray extra (requirements-dev.txt installs it)
from ray import serve  # noqa: E402

from dagster_octoai.api.client import OctoAIClient  # noqa: E402
from dagster_octoai.api.models import Engine  # noqa: E402
from dagster_octoai.api.video import SVD_FRAMES  # noqa: E402
from dagster_octoai.server import ServerConfig  # noqa: E402
from dagster_octoai.server.ray_config import RayEndpointConfig  # noqa: E402
from dagster_octoai.server.ray_serve import deploy, start_local_cluster, start_serve  # noqa: E402
from dagster_octoai.testing.seaweedfs import SeaweedFS, s3_bucket, seaweedfs  # noqa: E402
from dagster_octoai.testing.server import sample_image_b64  # noqa: E402

__all__ = ["s3_bucket", "seaweedfs"]  # fixtures used by name

# One worker of a parallel run holds the module's cluster, its tests in file order (the
# ``ray`` group of tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOKEN = "ray-token-51c0de"
OTHER = "ray-other-token-9e2f"
ADMIN = "ray-admin-token-3b7a"
APP = "octoai"
JOBS_BUCKET = "ray-jobs"
GENERATOR = "OctoAIGenerator"
LATENCY_S = 0.3
ENDPOINT = RayEndpointConfig(
    server=ServerConfig(
        token=TOKEN,
        extra_tokens=[OTHER],
        control_routes=True,
        admin_token=ADMIN,
        latency_per_image_s=LATENCY_S,
        # The frontends' shared store; the fixture creates the bucket and names SeaweedFS.
        jobs_url=f"s3://{JOBS_BUCKET}/jobs",
        async_sweep_interval_s=0.5,
    ),
    min_replicas=0,
    max_replicas=2,
    idle_timeout_s=3,
    upscale_delay_s=0,
    look_back_period_s=1,
    max_queued_requests=3,
    retry_after_s=2,
    cpus_per_replica=1,
    frontend_replicas=2,
    job_lease_s=3,
    graceful_shutdown_timeout_s=10,
)
# Serve's controller and handles report load every 10 s by default: too slow for a test of
# scaling. Set before the cluster starts, so that every Ray process inherits them.
_FAST_METRICS = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.2",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.2",
}


@dataclass
class Endpoint:
    url: str
    token: str
    address: str
    port: int
    ray_env: dict[str, str]
    token_path: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def endpoint(seaweedfs: SeaweedFS) -> Iterator[Endpoint]:
    started = time.monotonic()
    # The frontends share one S3 job store; every Ray process inherits its credentials.
    with contextlib.suppress(Exception):  # made already by an earlier module of the session
        seaweedfs.client().create_bucket(Bucket=JOBS_BUCKET)
    credentials = {
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "AWS_DEFAULT_REGION": seaweedfs.region,
    }
    saved = {name: os.environ.get(name) for name in {**_FAST_METRICS, **credentials}}
    os.environ.update(_FAST_METRICS)
    os.environ.update(credentials)
    config = ENDPOINT.model_copy(
        update={"server": ENDPOINT.server.updated({"jobs_endpoint_url": seaweedfs.endpoint_url})}
    )
    port = _free_port()
    token = start_local_cluster(num_cpus=4, log_to_driver=False, namespace="dagster-octoai-tests")
    try:
        start_serve({"host": "127.0.0.1", "port": port})
        deploy(config, name=APP, route_prefix="/")
        address = ray.get_runtime_context().gcs_address
        print(f"\nRay cluster and endpoint up in {time.monotonic() - started:.1f} s")
        yield Endpoint(f"http://127.0.0.1:{port}", TOKEN, address, port, token.env(), token.path)
    finally:
        serve.shutdown()
        ray.shutdown()
        token.remove()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        print(f"Ray module done in {time.monotonic() - started:.1f} s")


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _running_generators() -> int:
    app = serve.status().applications[APP]
    states = app.deployments[GENERATOR].replica_states
    return int(states.get("RUNNING", 0))


def _wait_for(what: str, check: Any, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.25)


async def _burst(url: str, count: int, **body: Any) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=_auth(), timeout=120) as client:
        return await asyncio.gather(
            *(
                client.post("/generate/sd", json={"prompt": f"burst {i}", "seed": i, **body})
                for i in range(count)
            )
        )


def test_serve_is_started_again_when_its_first_proxy_dies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CI saw Serve's controller kill a proxy too slow for its ready check, which failed
    # serve.start with the dead proxy's error; the retry is this test's one mocked branch.
    calls: list[dict[str, Any]] = []

    def start(http_options: dict[str, Any]) -> None:
        calls.append(http_options)
        if len(calls) < 3:
            raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(serve, "start", start)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    start_serve({"port": 1})
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ray.exceptions.ActorDiedError):
        start_serve({"port": 1}, attempts=2)
    assert len(calls) == 2


def test_a_frontend_that_cannot_see_the_model_directory_leaves_names_to_the_generators(
    tmp_path: Path,
) -> None:
    from dagster_octoai.api.models import ImageGenerationRequest
    from dagster_octoai.server.ray_serve import _RemoteBackend

    unseen = ServerConfig(backend="diffusers", models=str(tmp_path / "on-another-node"))
    request = ImageGenerationRequest.model_validate(
        {"prompt": "x", "engine": "sd", "checkpoint": "anything"}
    )
    assert _RemoteBackend(unseen).check(request) == []
    assert _RemoteBackend(ServerConfig()).check(request) == []  # the placeholder: no names
    # Nor can it tell which engines have weights: every one goes on to the generators.
    assert _RemoteBackend(unseen).engines == tuple(Engine)
    assert _RemoteBackend(ServerConfig()).engines == tuple(Engine)


def test_the_local_cluster_gives_serve_proxies_time_to_start(endpoint: Endpoint) -> None:
    def proxy_timeout() -> str | None:
        return os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S")

    assert ray.get(ray.remote(proxy_timeout).remote()) == "30"
    assert "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S" not in os.environ  # the caller's, as it was


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


_GCS_PROBE = """
import sys
from ray._raylet import GcsClient
GcsClient(address=sys.argv[1]).internal_kv_get(b"probe", None, timeout=10)
"""


def test_the_local_cluster_listens_on_loopback_only_with_token_auth(endpoint: Endpoint) -> None:
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    ours = psutil.Process()
    listeners: list[tuple[str, str, int]] = []
    token = endpoint.token_path.read_text().strip()
    for proc in [ours, *ours.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listeners.append((name, conn.laddr.ip, conn.laddr.port))
            # The generated token is in no command line and no environment of the cluster.
            assert token not in " ".join(proc.cmdline()), name
            with contextlib.suppress(psutil.AccessDenied):
                assert token not in "".join(proc.environ().values()), name
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the cluster's processes were seen
    assert any("ray::" in name or "Agent" in name for name in names), listeners
    exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    # Token authentication: on in this driver, and the GCS refuses a wrong token.
    assert is_token_auth_enabled()
    assert endpoint.token_path.stat().st_mode & 0o077 == 0
    probe = [sys.executable, "-c", _GCS_PROBE, endpoint.address]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    wrong = {**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    refused = subprocess.run(probe, env=wrong, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "auth" in (refused.stderr + refused.stdout).lower(), refused.stderr[-2000:]
    right = {**clean, **endpoint.ray_env}
    allowed = subprocess.run(probe, env=right, capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_serve_ray_refuses_a_cluster_without_token_auth(endpoint: Endpoint) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    clean["OCTOAI_TOKEN"] = "cli-ray-token-7f"
    command = [sys.executable, "-m", "dagster_octoai.server.cli", "serve-ray", "--address"]
    done = subprocess.run(
        [*command, endpoint.address], env=clean, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "RAY_AUTH_MODE is unset" in done.stderr
    assert "--allow-ray-without-token-auth" in done.stderr


def test_a_cold_start_from_zero_replicas(endpoint: Endpoint) -> None:
    _wait_for("no generator replica at first", lambda: _running_generators() == 0)
    r = httpx.post(
        f"{endpoint.url}/generate/sd",
        json={"prompt": "cold", "seed": 1},
        headers=_auth(),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["seed"] == 1
    assert r.headers["x-octoai-replica"]
    assert _running_generators() >= 1


def test_requests_spread_over_two_replicas(endpoint: Endpoint) -> None:
    # Load until Serve has scaled up (how soon depends on the box's load, not on a count).
    replicas: set[str] = set()
    deadline = time.monotonic() + 120
    while len(replicas) < 2:
        assert time.monotonic() < deadline, f"one replica served everything: {replicas}"
        # Three at once: within one frontend's queue bound (3) even if all land on one
        # frontend whose handle still counts its replica busy (seen once with four: a 429).
        answers = asyncio.run(_burst(endpoint.url, 3))
        assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
        replicas |= {a.headers["x-octoai-replica"] for a in answers}
    # Never more than max_replicas. Not "== 2": by now Serve may already have scaled one of
    # the two back down (the burst is over), which CI saw once.
    assert 1 <= _running_generators() <= ENDPOINT.max_replicas


def test_requests_beyond_the_replicas_queue_and_past_the_bound_get_429(
    endpoint: Endpoint,
) -> None:
    # 20 requests of 1.2 s each: all of them arrive while the first ones still run.
    answers = asyncio.run(_burst(endpoint.url, 20, num_images=4))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429}, [a.text for a in answers if a.status_code not in (200, 429)]
    # More were served than there are replicas: they queued until a replica was free.
    assert statuses.count(200) > ENDPOINT.max_replicas
    # Past 2 replicas and 2 frontends x 3 queued, the rest are told when to come back
    # (how many exactly depends on how fast the burst arrives: a freed slot takes one more).
    assert statuses.count(429) >= 1
    for answer in answers:
        if answer.status_code == 429:
            assert answer.headers["retry-after"] == "2"
            assert "busy" in answer.json()["message"]


def _submit(url: str, token: str = TOKEN, **body: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/generate/sd",
        json={"prompt": "async", "seed": 5, **body},
        headers={**_auth(token), "X-OctoAI-Async": "1"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    accepted: dict[str, Any] = r.json()
    return accepted


def test_async_jobs_are_seen_by_every_frontend(endpoint: Endpoint) -> None:
    jobs = [_submit(endpoint.url, seed=100 + i, num_images=2) for i in range(3)]
    frontends: set[str] = set()
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 90
    while len(done) < len(jobs) or len(frontends) < 2:
        assert time.monotonic() < deadline, (done, frontends)
        for job in jobs:
            r = httpx.get(job["poll_url"], headers=_auth())
            assert r.status_code == 200, r.text
            frontends.add(r.headers["x-octoai-frontend"])
            if r.json()["status"] == "completed":
                done[job["response_id"]] = r.json()
        time.sleep(0.1)
    assert len(frontends) == 2
    for i, job in enumerate(jobs):
        result = httpx.get(done[job["response_id"]]["response_url"], headers=_auth())
        assert result.status_code == 200
        assert [im["seed"] for im in result.json()["images"]] == [100 + i, 101 + i]
        # Another token of the same endpoint finds nothing, on any frontend.
        for _ in range(4):
            assert httpx.get(job["poll_url"], headers=_auth(OTHER)).status_code == 404
    # The same request made synchronously gives the same bytes.
    sync = httpx.post(
        f"{endpoint.url}/generate/sd",
        json={"prompt": "async", "seed": 100, "num_images": 2},
        headers=_auth(),
        timeout=120,
    )
    first = httpx.get(done[jobs[0]["response_id"]]["response_url"], headers=_auth()).json()
    assert [im["image_b64"] for im in sync.json()["images"]] == [
        im["image_b64"] for im in first["images"]
    ]


def test_the_official_sdk_and_the_package_client_unchanged(endpoint: Endpoint) -> None:
    from octoai.client import OctoAI
    from octoai.environment import OctoAIEnvironment

    url = endpoint.url
    env = OctoAIEnvironment(default=url, image_gen=url, text_gen=url)
    with httpx.Client(headers=_auth(), timeout=120) as http:
        sdk = OctoAI(api_key=TOKEN, environment=env, httpx_client=http)
        sdxl = sdk.image_gen.generate_sdxl(prompt="a lighthouse", seed=7, steps=10)
        assert sdxl.images[0].seed == 7
        future = sdk.infer_async(f"{url}/generate/sd", {"prompt": "a fox", "seed": 8})
        _wait_for("the SDK's future", lambda: sdk.is_future_ready(future))
        result = sdk.get_future_result(future)
        assert result is not None and result["images"][0]["seed"] == 8
    with OctoAIClient(TOKEN, base_url=url, timeout=120) as client:
        response = client.generate({"prompt": "a teapot", "seed": 9}, engine="sd")
        assert response.images[0].seed == 9 and response.images[0].data
        job = client.submit({"prompt": "a kettle", "seed": 10}, engine="sd")
        fetched = client.wait(job)
        assert fetched.images[0].seed == 10
        # Video: sync and async, rendered on a generator, the same seed the same clip.
        still = sample_image_b64((160, 90))
        clip = client.generate_video({"image": still, "seed": 11, "fps": 5})
        video_job = client.submit_video({"image": still, "seed": 11, "fps": 5})
        waited = client.wait_video(video_job, timeout=120, poll_interval_s=0.1)
        assert clip.seeds == waited.seeds == [11]
        assert waited.videos[0].data == clip.videos[0].data
        with av.open(io.BytesIO(clip.videos[0].data), mode="r") as container:
            assert len(list(container.decode(video=0))) == SVD_FRAMES


def _replica_actors(deployment: str) -> list[Any]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return [
        ray.get_actor(item["name"], namespace=item["namespace"])
        for item in names
        if f"{APP}#{deployment}#" in item["name"] and "REPLICA" in item["name"]
    ]


def _generator_actors() -> list[Any]:
    return _replica_actors(GENERATOR)


def test_a_job_whose_replica_dies_runs_once_more(endpoint: Endpoint) -> None:
    accepted = _submit(endpoint.url, seed=1, num_images=16)  # about 5 s on its replica

    def running() -> bool:
        r = httpx.get(accepted["poll_url"], headers=_auth())
        return bool(r.json()["status"] == "running")

    _wait_for("the job running", running)
    for actor in _generator_actors():
        ray.kill(actor, no_restart=True)
    # Retried once on the replica Serve starts instead: it completes (or, if that one died
    # too, fails saying why); never lost, never a 404.
    deadline = time.monotonic() + 120
    while (answer := httpx.get(accepted["poll_url"], headers=_auth()).json())["status"] not in (
        "completed",
        "failed",
    ):
        assert answer["status"] in ("pending", "running"), answer
        assert time.monotonic() < deadline, "the job of a dead replica never ended"
        time.sleep(0.2)
    if answer["status"] == "failed":
        assert "stopped" in answer["error"] and "resubmit" in answer["error"], answer
    else:
        result = httpx.get(answer["response_url"], headers=_auth()).json()
        assert [im["seed"] for im in result["images"]] == list(range(1, 17))


def test_idempotency_key_and_cancel_on_any_frontend(endpoint: Endpoint) -> None:
    headers = {**_auth(), "X-OctoAI-Async": "1", "Idempotency-Key": "ray-" + secrets.token_hex(4)}
    body = {"prompt": "once", "seed": 41}
    first = httpx.post(f"{endpoint.url}/generate/sd", json=body, headers=headers, timeout=60)
    assert first.status_code == 201, first.text
    # Repeats until both frontends have answered one (Serve picks the frontend): each
    # gets the first job.
    repeats: list[httpx.Response] = []
    while len({r.headers["x-octoai-frontend"] for r in [first, *repeats]}) < 2:
        assert len(repeats) < 40, "one frontend answered every request"
        repeats.append(
            httpx.post(f"{endpoint.url}/generate/sd", json=body, headers=headers, timeout=60)
        )
    assert {r.json()["response_id"] for r in repeats} == {first.json()["response_id"]}
    other = httpx.post(
        f"{endpoint.url}/generate/sd", json={**body, "seed": 42}, headers=headers, timeout=60
    )
    assert other.status_code == 409, other.text
    # A job cancelled at once (about 5 s of work): whichever frontend runs it stops it.
    doomed = _submit(endpoint.url, seed=43, num_images=16)
    cancelled = httpx.delete(doomed["poll_url"], headers=_auth(), timeout=30)
    assert cancelled.status_code == 200, cancelled.text
    _wait_for(
        "the job cancelled",
        lambda: httpx.get(doomed["poll_url"], headers=_auth()).json()["status"] == "cancelled",
        30,
    )


def test_idle_replicas_scale_down_to_zero_and_back_up(endpoint: Endpoint) -> None:
    _wait_for("scaled to zero after the idle timeout", lambda: _running_generators() == 0, 120)
    r = httpx.post(
        f"{endpoint.url}/generate/sd",
        json={"prompt": "warm", "seed": 3},
        headers=_auth(),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert _running_generators() >= 1


def test_killed_frontends_lose_no_completed_result(endpoint: Endpoint) -> None:
    # A completed job, and one accepted with no generator running (a cold start) at the
    # frontend that then dies: the first is served byte for byte by the frontends Serve
    # starts instead, the second runs there (its lease lapses; another frontend takes it).
    done = _submit(endpoint.url, seed=20, num_images=2)
    _wait_for(
        "the first job completed",
        lambda: httpx.get(done["poll_url"], headers=_auth()).json()["status"] == "completed",
    )
    before = httpx.get(f"{endpoint.url}/v1/responses/{done['response_id']}", headers=_auth())
    assert before.status_code == 200
    _wait_for("scaled to zero again", lambda: _running_generators() == 0, 120)
    accepted = _submit(endpoint.url, seed=21)
    for actor in _replica_actors("OctoAIFrontend"):
        ray.kill(actor, no_restart=True)
    # Replacing the frontends takes Serve most of a minute on a loaded 2-core box.
    deadline = time.monotonic() + 180
    status = "pending"
    while status not in ("failed", "completed"):
        assert time.monotonic() < deadline, f"the job is still {status}"
        time.sleep(0.5)
        try:
            r = httpx.get(accepted["poll_url"], headers=_auth(), timeout=10)
        except httpx.TransportError:
            continue  # Serve is replacing the frontends
        if r.status_code == 200:
            status = r.json()["status"]
    assert status == "completed", r.json()
    after = httpx.get(f"{endpoint.url}/v1/responses/{done['response_id']}", headers=_auth())
    assert after.status_code == 200 and after.content == before.content


def test_the_example_dagster_job_runs_against_it(
    endpoint: Endpoint,
    seaweedfs: SeaweedFS,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from _support import example_project_env
    from dagster import AssetKey, instance_for_test

    from example_project.definitions import build_definitions
    from example_project.settings import ExampleSettings

    env = example_project_env(endpoint, seaweedfs, s3_bucket, tmp_path / "output")  # type: ignore[arg-type]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    defs = build_definitions(ExampleSettings.from_env(env))
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    with instance_for_test() as instance:
        # The catalogue and the product shot with its checks: the job's other images go
        # through the same client and endpoint (tests/test_example_project.py runs them all).
        result = defs.resolve_job_def("product_images_job").execute_in_process(
            instance=instance,
            partition_key="desk-lamp",
            run_config=quiet,
            asset_selection=[AssetKey("prompt_catalogue"), AssetKey("product_images")],
        )
        assert result.success
        assert all(e.passed for e in result.get_asset_check_evaluations())
    keys = seaweedfs.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert any(
        "product_images/partition=desk-lamp/_objects/" in k["Key"] and "/000-seed" in k["Key"]
        for k in keys
    )


def test_the_diffusers_backend_runs_under_it(
    endpoint: Endpoint, tiny_models: Path, tmp_path: Path
) -> None:
    # The diffusion extra and the diffusers backend (issue 14); the tiny random-weight models
    # (tests/conftest.py: written once per run, shared with the diffusion tests), SD 1.5's
    # only: the other engines have no weights here.
    pytest.importorskip("dagster_octoai.server.backends.diffusers")
    models = tmp_path / "models"
    models.mkdir()
    (models / "sd15").symlink_to(tiny_models / "sd15", target_is_directory=True)
    config = RayEndpointConfig(
        server=ServerConfig(token=TOKEN, backend="diffusers", models=str(models), device=("cpu",)),
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=1,
    )
    deploy(config, name="octoai-diffusers", route_prefix="/diffusers")
    url = f"{endpoint.url}/diffusers"
    try:
        with OctoAIClient(TOKEN, base_url=url, timeout=600) as client:
            response = client.generate(
                {"prompt": "a red fox", "seed": 11, "steps": 2, "width": 512, "height": 512},
                engine="sd",
            )
            assert response.images[0].seed == 11
            assert response.images[0].size == (512, 512)
            again = client.generate(
                {"prompt": "a red fox", "seed": 11, "steps": 2, "width": 512, "height": 512},
                engine="sd",
            )
            assert again.images[0].data == response.images[0].data  # same seed, same bytes
            job = client.submit({"prompt": "a fox", "seed": 12, "steps": 2}, engine="sd")
            assert client.wait(job).images[0].seed == 12
        # What only the backend can judge is still the client's 422, naming the field.
        r = httpx.post(
            f"{url}/generate/sd",
            json={"prompt": "x", "steps": 2, "checkpoint": "no-such-checkpoint"},
            headers=_auth(),
            timeout=600,
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "checkpoint"]
        # The frontends see the model directory here: an async job naming an unknown LoRA
        # is refused at once, not accepted to fail later.
        r = httpx.post(
            f"{url}/generate/sd",
            json={"prompt": "x", "steps": 2, "loras": {"tiny-crayon": 0.5, "no-such-lora": 1}},
            headers={**_auth(), "X-OctoAI-Async": "1"},
            timeout=60,
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "loras", "no-such-lora"]
        assert "tiny-crayon, tiny-ink" in r.json()["detail"][0]["msg"]
        # An engine without weights is unknown, as on one server (was the generator's 422).
        r = httpx.post(
            f"{url}/generate/flux-schnell", json={"prompt": "x"}, headers=_auth(), timeout=60
        )
        assert r.status_code == 404, r.text
        assert "Engine 'flux-schnell' not found; available: sd, controlnet-sd15" in r.text
    finally:
        serve.delete("octoai-diffusers")


def test_the_serve_ray_command(endpoint: Endpoint) -> None:
    # The command connects to the running cluster and mounts a second application.
    env = {**os.environ, **endpoint.ray_env, "OCTOAI_TOKEN": "cli-ray-token-7f"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster_octoai.server.cli",
            "serve-ray",
            "--address",
            endpoint.address,
            "--app-name",
            "octoai-cli",
            "--route-prefix",
            "/cli",
            "--port",
            str(endpoint.port),
            "--min-replicas",
            "1",
            "--max-replicas",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"{endpoint.url}/cli"

        def healthy() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                return httpx.get(f"{url}/healthcheck").status_code == 200
            except httpx.TransportError:
                return False

        _wait_for("the command's application", healthy, 180)
        r = httpx.post(
            f"{url}/generate/sd",
            json={"prompt": "cli", "seed": 4},
            headers=_auth("cli-ray-token-7f"),
            timeout=120,
        )
        assert r.status_code == 200, r.text
        accepted = httpx.post(
            f"{url}/generate/sd",
            json={"prompt": "cli", "seed": 4},
            headers={**_auth("cli-ray-token-7f"), "X-OctoAI-Async": "1"},
        ).json()
        assert accepted["poll_url"].startswith(f"{url}/v1/requests/")
        # The first application's token is not this one's.
        assert (
            httpx.post(f"{url}/generate/sd", json={"prompt": "x"}, headers=_auth()).status_code
            == 401
        )
        proc.send_signal(signal.SIGTERM)
        try:
            # Serve drains the application's replicas first: seconds, once over a minute
            # on a loaded box.
            code = proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            app = serve.status().applications.get("octoai-cli")
            told = proc.stderr.read()[-4000:] if proc.stderr else ""
            pytest.fail(f"serve-ray still stopping after 150 s; the app: {app}\n{told}")
        err = proc.stderr.read() if proc.stderr else ""
        ours = "\n".join(line for line in err.splitlines() if "pid=" not in line)
        assert code == 0, ours[-4000:]
        assert "stopping: deleting application 'octoai-cli'" in ours
        assert ours.rstrip().endswith("dagster-octoai serve-ray: stopped"), ours[-2000:]
        assert "octoai-cli" not in serve.status().applications
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
