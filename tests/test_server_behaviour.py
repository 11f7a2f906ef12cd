"""Service behaviour of the local server: replicas, latency, rate limits, faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dagster_octoai.server import FaultConfig, LocalOctoAIServer

pytestmark = pytest.mark.timeout(90)

Factory = Callable[..., LocalOctoAIServer]
BODY = {"prompt": "a fox", "seed": 1}


def _headers(srv: LocalOctoAIServer, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.token}", **extra}


async def _concurrent_posts(srv: LocalOctoAIServer, count: int, body: dict[str, Any]) -> list[int]:
    async with httpx.AsyncClient(base_url=srv.url, headers=_headers(srv), timeout=60) as client:
        answers = await asyncio.gather(
            *(client.post("/generate/sd", json=body) for _ in range(count))
        )
    return [a.status_code for a in answers]


def test_replicas_bound_concurrency_and_the_rest_queue(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(latency_per_image_s=0.3, replicas=2)
    statuses = asyncio.run(_concurrent_posts(srv, 6, BODY))
    assert statuses == [200] * 6
    stats = srv.stats()
    assert stats["in_flight_max"] == 2
    assert stats["queued_max"] >= 1  # more requests than replicas: some had to wait
    assert stats["in_flight"] == 0 and stats["queued"] == 0
    assert stats["paid_generations"] == 6


def test_more_replicas_means_more_at_once(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(latency_per_image_s=0.3, replicas=1)
    asyncio.run(_concurrent_posts(srv, 3, BODY))
    assert srv.stats()["in_flight_max"] == 1
    srv.configure(replicas=3)
    srv.reset_stats()
    asyncio.run(_concurrent_posts(srv, 3, BODY))
    assert srv.stats()["in_flight_max"] == 3


def test_latency_is_per_image(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(latency_per_image_s=0.2)
    r = httpx.post(
        f"{srv.url}/generate/sd",
        json={**BODY, "num_images": 3},
        headers=_headers(srv),
        timeout=30,
    )
    assert r.status_code == 200
    # The server's own measure of the generation, not the test's wall clock.
    assert r.json()["prediction_time_ms"] >= 600


def test_async_jobs_share_the_replicas(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(latency_per_image_s=0.2, replicas=1)
    with httpx.Client(base_url=srv.url, headers=_headers(srv), timeout=30) as client:
        polls = [
            client.post("/generate/sd", json=BODY, headers={"X-OctoAI-Async": "1"}).json()[
                "poll_url"
            ]
            for _ in range(3)
        ]
        deadline = time.monotonic() + 20
        while any(client.get(p).json()["status"] != "completed" for p in polls):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    stats = srv.stats()
    assert stats["in_flight_max"] == 1
    assert stats["async_jobs"]["completed"] == 3


def test_async_queue_delay_keeps_jobs_pending(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(async_queue_delay_s=0.5)
    with httpx.Client(base_url=srv.url, headers=_headers(srv), timeout=30) as client:
        poll_url = client.post("/generate/sd", json=BODY, headers={"X-OctoAI-Async": "1"}).json()[
            "poll_url"
        ]
        assert client.get(poll_url).json()["status"] == "pending"
        assert srv.stats()["async_jobs"]["pending"] == 1


def test_rate_limit_answers_429_with_retry_after(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(rate_limit_requests=3, rate_limit_window_s=30)
    with httpx.Client(base_url=srv.url, headers=_headers(srv), timeout=30) as client:
        statuses = [client.post("/generate/sd", json=BODY).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        limited = client.post("/generate/sd", json=BODY)
        assert limited.status_code == 429
        retry_after = int(limited.headers["retry-after"])
        assert 1 <= retry_after <= 30
        assert "Rate limit" in limited.json()["message"]
        # Polls and health checks are not rate limited.
        assert client.get("/healthcheck").status_code == 200
    stats = srv.stats()
    assert stats["rate_limited"] == 3
    assert stats["paid_generations"] == 3


def test_rate_limit_window_slides(octoai_server_factory: Factory) -> None:
    # The second request must land inside the window of the first, whatever the load: a
    # window of 2 s leaves room for a slow first answer (0.5 s once proved too short).
    srv = octoai_server_factory(rate_limit_requests=1, rate_limit_window_s=2.0)
    with httpx.Client(base_url=srv.url, headers=_headers(srv), timeout=30) as client:
        assert client.post("/generate/sd", json=BODY).status_code == 200
        assert client.post("/generate/sd", json=BODY).status_code == 429
        time.sleep(2.1)
        assert client.post("/generate/sd", json=BODY).status_code == 200


# ---- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status"),
    [("rate_limited", 429), ("error_500", 500), ("error_503", 503)],
)
def test_status_faults(octoai_server_factory: Factory, fault: str, status: int) -> None:
    srv = octoai_server_factory(faults=FaultConfig(**{fault: 1.0}, retry_after_s=7))
    r = httpx.post(f"{srv.url}/generate/sd", json=BODY, headers=_headers(srv), timeout=30)
    assert r.status_code == status
    assert r.json()["message"]
    assert r.headers["x-user-request-id"]
    if status == 429:
        assert r.headers["retry-after"] == "7"
    stats = srv.stats()
    assert stats["faults"] == {fault: 1}
    assert stats["paid_generations"] == 0


#: What a client may see of a connection closed without an answer: the server's FIN
#: (RemoteProtocolError), or its RST (ReadError, WriteError) when the request's last bytes
#: were still unread by the server as it closed, which happens on a loaded box. Never an answer,
#: never a refused connection (ConnectError).
DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def test_dropped_connection_is_a_connection_error_not_a_500(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(faults=FaultConfig(drop_connection=1.0))
    with httpx.Client(base_url=srv.url, headers=_headers(srv), timeout=30) as client:
        with pytest.raises(DROPPED):
            client.post("/generate/sd", json=BODY)
        # The server lives on, and the next connection works.
        assert client.get("/healthcheck").status_code == 200
    stats = srv.stats()
    assert stats["requests"]["POST /generate/{engine}"] == {"dropped": 1}
    assert stats["paid_generations"] == 0


def test_drop_after_render_loses_a_paid_answer(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(faults=FaultConfig(drop_after_render=1.0))
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{srv.url}/generate/sd", json={**BODY, "num_images": 2}, headers=_headers(srv))
    stats = srv.stats()
    assert stats["paid_generations"] == 2
    assert stats["faults"] == {"drop_after_render": 1}


def test_slow_answers_arrive_late_and_time_out_a_client(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(faults=FaultConfig(slow=1.0, slow_s=1.0))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/generate/sd", json=BODY, headers=_headers(srv), timeout=0.3)
    r = httpx.post(f"{srv.url}/generate/sd", json=BODY, headers=_headers(srv), timeout=10)
    assert r.status_code == 200
    log = [x for x in srv.requests() if x["route"] == "/generate/{engine}"]
    assert [x["fault"] for x in log] == ["slow", "slow"]
    assert log[-1]["duration_ms"] >= 1000


def test_long_running_async_job_fails(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(faults=FaultConfig(job_failure=1.0, job_failure_after_s=1.0))
    with httpx.Client(base_url=srv.url, headers=_headers(srv), timeout=30) as client:
        accepted = client.post("/generate/sd", json=BODY, headers={"X-OctoAI-Async": "1"}).json()
        # Pending until a replica claims it (on a loaded box, after this first poll), then
        # running for the fault's second.
        deadline = time.monotonic() + 10
        while (status := client.get(accepted["poll_url"]).json()["status"]) == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert status == "running"
        deadline = time.monotonic() + 10
        while (answer := client.get(accepted["poll_url"]).json())["status"] != "failed":
            assert time.monotonic() < deadline, answer
            time.sleep(0.05)
        assert "resubmit" in answer["error"]
        assert "response_url" not in answer
        fetched = client.get(f"/v1/responses/{accepted['response_id']}")
        assert fetched.status_code == 500
    stats = srv.stats()
    assert stats["async_jobs"]["failed"] == 1
    assert stats["faults"] == {"job_failure": 1}
    assert stats["paid_generations"] == 0


def test_faults_on_async_routes_only_when_asked(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory()
    with httpx.Client(base_url=srv.url, headers=_headers(srv), timeout=30) as client:
        poll_url = client.post("/generate/sd", json=BODY, headers={"X-OctoAI-Async": "1"}).json()[
            "poll_url"
        ]
        srv.configure(faults={"error_503": 1.0})
        assert client.get(poll_url).status_code == 200
        srv.configure(faults={"error_503": 1.0, "on_async_routes": True})
        assert client.get(poll_url).status_code == 503
        assert client.get("/healthcheck").status_code == 200


def _fault_sequence(srv: LocalOctoAIServer, count: int) -> list[str]:
    out = []
    with httpx.Client(base_url=srv.url, headers=_headers(srv), timeout=30) as client:
        for _ in range(count):
            try:
                out.append(str(client.post("/generate/sd", json=BODY).status_code))
            except httpx.TransportError:
                out.append("dropped")
    return out


def test_fault_draws_are_reproducible_with_a_seed(octoai_server_factory: Factory) -> None:
    faults = FaultConfig(
        rate_limited=0.2, error_500=0.2, error_503=0.1, drop_connection=0.1, seed=42
    )
    first = _fault_sequence(octoai_server_factory(faults=faults), 30)
    second = _fault_sequence(octoai_server_factory(faults=faults), 30)
    other = _fault_sequence(
        octoai_server_factory(faults=faults.model_copy(update={"seed": 43})), 30
    )
    assert first == second
    assert first != other
    assert {"200", "429", "500", "503", "dropped"} <= set(first)


def test_reconfiguring_faults_restarts_the_draws(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(faults=FaultConfig(error_500=0.5, seed=5))
    first = _fault_sequence(srv, 12)
    srv.configure(faults={"seed": 5})
    assert _fault_sequence(srv, 12) == first


def test_fault_fractions_must_fit() -> None:
    with pytest.raises(ValueError, match="at most 1"):
        FaultConfig(error_500=0.6, error_503=0.6)


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_drops_work_with_either_uvicorn_http_implementation(http: str) -> None:
    # A plain `pip install uvicorn` serves with h11; uvicorn[standard] with httptools.
    import threading

    import uvicorn

    from dagster_octoai.server import ServerConfig, create_app
    from dagster_octoai.server.runner import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    app = create_app(ServerConfig(token="t", faults=FaultConfig(drop_connection=1.0)))
    server = uvicorn.Server(
        uvicorn.Config(app, http=http, loop="asyncio", log_level="warning", ws="none")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(DROPPED):
            httpx.post(f"{url}/generate/sd", json=BODY, headers={"Authorization": "Bearer t"})
        assert httpx.get(f"{url}/healthcheck").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert app.state.octoai.stats.faults["drop_connection"] == 1


def test_a_queue_bound_answers_429_with_retry_after_past_it(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(
        latency_per_image_s=1.5, replicas=1, max_queued_requests=2, queue_retry_after_s=3
    )
    # 1.5 s per image: the six arrive long before the first is done, however loaded the box.
    answers = asyncio.run(_concurrent_posts_answers(srv, 6, BODY))
    statuses = sorted(a.status_code for a in answers)
    # One on the replica, two waiting; the other three are told when to come back.
    assert statuses == [200, 200, 200, 429, 429, 429]
    for answer in answers:
        if answer.status_code == 429:
            assert answer.headers["retry-after"] == "3"
    stats = srv.stats()
    assert stats["queued_max"] == 2 and stats["paid_generations"] == 3
    # Async jobs are never refused for the queue: they wait.
    with httpx.Client(base_url=srv.url, headers=_headers(srv), timeout=30) as client:
        for _ in range(4):
            r = client.post("/generate/sd", json=BODY, headers={"X-OctoAI-Async": "1"})
            assert r.status_code == 201


async def _concurrent_posts_answers(
    srv: LocalOctoAIServer, count: int, body: dict[str, Any]
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=srv.url, headers=_headers(srv), timeout=60) as client:
        return await asyncio.gather(*(client.post("/generate/sd", json=body) for _ in range(count)))
