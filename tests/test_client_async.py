"""AsyncOctoAIClient over real loopback HTTP, against a server scripted per test."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from _scripted_server import (
    Recorded,
    Reply,
    ScriptedServer,
    generation_body,
    jpeg_bytes,
    module_scripted_server,
    ok,
    scripted_server,
    server,
)

from dagster_octoai.api import errors
from dagster_octoai.api.client import AsyncOctoAIClient, HTTPRetryPolicy
from dagster_octoai.api.models import JobStatus
from dagster_octoai.version import __version__

TOKEN = "sk-async-SECRET-9876543210"
FAST = HTTPRetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, deadline_s=30)
T = TypeVar("T")

__all__ = ["module_scripted_server", "server"]  # fixtures used by this module

pytestmark = pytest.mark.timeout(60)


def run(
    server: ScriptedServer,
    body: Callable[[AsyncOctoAIClient], Awaitable[T]],
    **kwargs: Any,
) -> T:
    """Run ``body`` with a fresh client inside a fresh event loop."""

    async def main() -> T:
        kwargs.setdefault("retry", FAST)
        async with AsyncOctoAIClient(TOKEN, base_url=server.url, **kwargs) as client:
            return await body(client)

    return asyncio.run(main())


def slow_ok(delay: float = 0.1) -> Callable[[Recorded], Reply]:
    def reply(request: Recorded) -> Reply:
        return Reply(200, generation_body([request.json()["seed"]]), delay_s=delay)

    return reply


def test_repr_hides_token() -> None:
    async def main() -> str:
        async with AsyncOctoAIClient(TOKEN) as client:
            return repr(client)

    assert (
        asyncio.run(main()) == "AsyncOctoAIClient(base_url='https://image.octoai.run', token=***)"
    )


def test_generate(server: ScriptedServer) -> None:
    server.script(ok([4], request_id="r-1"))
    response = run(server, lambda c: c.generate({"prompt": "a fox", "seed": 4}, engine="sd"))
    (sent,) = server.requests
    assert sent.path == "/generate/sd"
    assert sent.json() == {"prompt": "a fox", "seed": 4}
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    assert sent.headers["user-agent"] == f"dagster-octoai/{__version__}"
    assert response.images[0].data == jpeg_bytes()
    assert response.call_info.request_ids == ("r-1",)


def test_validation_before_sending(server: ScriptedServer) -> None:
    with pytest.raises(errors.RequestValidationError, match="controlnet"):
        run(server, lambda c: c.generate({"prompt": "x"}, engine="controlnet-sdxl"))
    assert server.requests == []


def test_retries_statuses_drops_and_timeouts(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script(
        Reply(503, {"message": f"echo {TOKEN}"}),
        Reply(429, "", headers={"Retry-After": "0"}),
        Reply(200, generation_body(), drop=True),
        Reply(200, generation_body(), delay_s=2),
        ok([8]),
    )
    response = run(server, lambda c: c.generate({"prompt": "a fox"}), timeout=0.5)
    assert response.seeds == [8]
    assert response.call_info.attempts == 5
    assert len(server.requests) == 5
    retries = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(retries) == 4
    assert "status 503" in retries[0] and "(Retry-After)" in retries[1]
    assert "dropped" in retries[2] and "read timed out" in retries[3]
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


def test_retries_run_out(server: ScriptedServer) -> None:
    server.default = Reply(502, {"message": "bad gateway"})
    with pytest.raises(errors.ServerError, match="gave up after 2 attempts"):
        run(
            server,
            lambda c: c.generate({"prompt": "a fox"}),
            retry=HTTPRetryPolicy(max_attempts=2, initial_backoff_s=0.01),
        )
    assert len(server.requests) == 2


def test_deadline(server: ScriptedServer) -> None:
    server.default = Reply(200, generation_body(), delay_s=5)
    with pytest.raises(errors.DeadlineExceededError):
        run(
            server, lambda c: c.generate({"prompt": "a fox"}), retry=HTTPRetryPolicy(deadline_s=0.5)
        )
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("reply", "cls"),
    [
        (
            Reply(400, {"message": "violates our Acceptable Use Policy"}),
            errors.PolicyViolationError,
        ),
        (Reply(401, {"message": "no"}), errors.AuthenticationError),
        (Reply(403, {"message": "no"}), errors.PermissionDeniedError),
        (Reply(404, {"detail": "Not Found"}), errors.NotFoundError),
        (
            Reply(422, {"detail": [{"loc": ["body", "seed"], "msg": "bad"}]}),
            errors.UnprocessableEntityError,
        ),
        (Reply(200, "<html>oops</html>", content_type="text/html"), errors.ResponseFormatError),
    ],
)
def test_errors_are_mapped_and_not_retried(
    server: ScriptedServer, reply: Reply, cls: type[errors.OctoAIError]
) -> None:
    server.script(reply)
    with pytest.raises(cls):
        run(server, lambda c: c.generate({"prompt": "a fox"}))
    assert len(server.requests) == 1


def test_token_redacted_from_errors(server: ScriptedServer) -> None:
    server.script(
        lambda r: Reply(403, {"message": f"token {r.headers['authorization']} may not use sdxl"})
    )
    with pytest.raises(errors.PermissionDeniedError) as info:
        run(server, lambda c: c.generate({"prompt": "a fox"}))
    assert TOKEN not in str(info.value) and TOKEN not in str(info.value.body)


def test_submit_poll_fetch_wait(server: ScriptedServer) -> None:
    rurl = f"{server.url}/v1/responses/j1"
    server.script(
        Reply(201, {"response_id": "j1", "poll_url": f"{server.url}/v1/requests/j1"}),
        Reply(200, {"status": "pending"}),
        Reply(200, {"status": "running"}),
        Reply(200, {"status": "completed", "response_url": rurl}),
        ok([5]),
        Reply(200, {"status": "completed", "response_url": rurl}),
        ok([5]),
    )

    async def body(client: AsyncOctoAIClient) -> Any:
        job = await client.submit({"prompt": "a fox", "seed": 5})
        first = await client.poll(job)
        waited = await client.wait(job, timeout=10, poll_interval_s=0.02)
        fetched = await client.fetch(job)
        return job, first, waited, fetched

    job, first, waited, fetched = run(server, body)
    assert server.requests[0].headers["x-octoai-async"] == "1"
    assert job.response_id == "j1"
    assert first.status is JobStatus.PENDING
    assert waited.seeds == fetched.seeds == [5]
    assert waited.call_info.response_id == "j1"
    assert server.paths()[-2:] == ["GET /v1/requests/j1", "GET /v1/responses/j1"]


@pytest.mark.parametrize(
    ("poll", "cls"),
    [
        (Reply(200, {"status": "failed"}), errors.JobFailedError),
        (Reply(404, {"detail": "gone"}), errors.JobExpiredError),
    ],
)
def test_wait_ends_at_once(
    server: ScriptedServer, poll: Reply, cls: type[errors.OctoAIError]
) -> None:
    server.script(
        Reply(201, {"response_id": "j2", "poll_url": f"{server.url}/v1/requests/j2"}), poll
    )

    async def body(client: AsyncOctoAIClient) -> None:
        job = await client.submit({"prompt": "a fox"})
        await client.wait(job, timeout=30, poll_interval_s=0.02)

    with pytest.raises(cls) as info:
        run(server, body)
    assert info.value.response_id == "j2"
    assert len(server.requests) == 2


def test_wait_unknown_status_ends_at_the_timeout(server: ScriptedServer) -> None:
    server.script(Reply(201, {"response_id": "j3", "poll_url": f"{server.url}/v1/requests/j3"}))
    server.default = Reply(200, {"status": "paused"})

    async def body(client: AsyncOctoAIClient) -> None:
        job = await client.submit({"prompt": "a fox"})
        await client.wait(job, timeout=0.4, poll_interval_s=0.02, max_poll_interval_s=0.05)

    with pytest.raises(errors.DeadlineExceededError, match="paused"):
        run(server, body)
    assert len(server.requests) > 2


def test_submit_refuses_big_bodies(server: ScriptedServer) -> None:
    blob = b"\xff\xd8\xff" + bytes(4 * 1024 * 1024)
    request = {"prompt": "merge", "transfer_images": {"sks": [blob, blob]}}
    with pytest.raises(errors.RequestValidationError, match="10 MB"):
        run(server, lambda c: c.submit(request))
    assert server.requests == []


def test_health(server: ScriptedServer) -> None:
    server.script(Reply(200, "ok"), Reply(500, "down"))

    async def body(client: AsyncOctoAIClient) -> tuple[bool, bool]:
        return await client.health(), await client.health()

    assert run(server, body) == (True, False)


def test_generate_many_order_and_bound(server: ScriptedServer) -> None:
    server.default = slow_ok()

    async def body(client: AsyncOctoAIClient) -> list[Any]:
        return await client.generate_many([{"prompt": "fox", "seed": s} for s in range(8)])

    responses = run(server, body, max_concurrency=3)
    assert [r.seeds for r in responses] == [[s] for s in range(8)]
    assert server.max_in_flight == 3


def test_the_bound_holds_across_tasks(server: ScriptedServer) -> None:
    server.default = slow_ok()

    async def body(client: AsyncOctoAIClient) -> None:
        batches = [[{"prompt": "fox", "seed": s} for s in range(3)] for _ in range(3)]
        await asyncio.gather(*(client.generate_many(b) for b in batches))

    run(server, body, max_concurrency=2)
    assert len(server.requests) == 9
    assert server.max_in_flight == 2


def test_iter_generate_from_an_async_iterable_is_lazy(server: ScriptedServer) -> None:
    server.default = slow_ok(0.05)
    pulled = 0

    async def requests() -> AsyncIterator[dict[str, Any]]:
        nonlocal pulled
        for seed in range(30):
            pulled += 1
            yield {"prompt": "fox", "seed": seed}

    async def body(client: AsyncOctoAIClient) -> tuple[int, set[int]]:
        seen: set[int] = set()
        pulled_at_first = -1
        async for index, response in client.iter_generate(requests(), max_concurrency=2):
            assert response.seeds == [index]
            if pulled_at_first < 0:
                pulled_at_first = pulled
            seen.add(index)
        return pulled_at_first, seen

    pulled_at_first, seen = run(server, body, max_concurrency=4)
    assert pulled_at_first == 2
    assert seen == set(range(30))
    assert server.max_in_flight <= 2


def test_leaving_iter_generate_early_cancels_in_flight() -> None:
    # The reply depends on the seed, not on arrival order: the three requests race to
    # the server, and only seed 0 answers at once.
    def reply(request: Recorded) -> Reply:
        seed = request.json()["seed"]
        return Reply(200, generation_body([seed]), delay_s=0 if seed == 0 else 3)

    async def body(client: AsyncOctoAIClient) -> int:
        stream = client.iter_generate([{"prompt": "fox", "seed": s} for s in range(10)])
        async for index, _ in stream:
            await stream.aclose()
            return index
        return -1

    # A server of its own: a cancelled request may still reach the server after the test,
    # and must not be counted by the next test's shared server.
    with scripted_server() as server:
        server.default = reply
        assert run(server, body, max_concurrency=3) == 0
        # Nothing new was started after the consumer left: only the first three requests
        # were ever in flight (one may be cancelled before it reached the server).
        seeds = [r.json()["seed"] for r in server.requests]
    assert 0 in seeds and set(seeds) <= {0, 1, 2} and len(seeds) == len(set(seeds))


def test_batch_errors(server: ScriptedServer) -> None:
    def reply(request: Recorded) -> Reply:
        seed = request.json()["seed"]
        if seed == 2:
            return Reply(401, {"message": "bad token"})
        return Reply(200, generation_body([seed]), delay_s=0.1)

    server.default = reply

    async def raising(client: AsyncOctoAIClient) -> None:
        await client.generate_many([{"prompt": "fox", "seed": s} for s in range(6)])

    with pytest.raises(errors.AuthenticationError):
        run(server, raising, max_concurrency=3)
    assert sorted(r.json()["seed"] for r in server.requests) == [0, 1, 2]

    server.reset()
    server.default = reply

    async def collecting(client: AsyncOctoAIClient) -> list[Any]:
        return await client.generate_many(
            [{"prompt": "fox", "seed": s} for s in range(4)], return_exceptions=True
        )

    results = run(server, collecting, max_concurrency=3)
    assert isinstance(results[2], errors.AuthenticationError)
    assert [r.seeds for i, r in enumerate(results) if i != 2] == [[0], [1], [3]]


# ---- against the local OctoAI-compatible server ------------------------------------------

LOCAL_TOKEN = "test-token-0c7f3e9a"


def run_local(server: Any, body: Callable[[AsyncOctoAIClient], Awaitable[T]], **kwargs: Any) -> T:
    async def main() -> T:
        kwargs.setdefault("retry", FAST)
        async with AsyncOctoAIClient(LOCAL_TOKEN, base_url=server.url, **kwargs) as client:
            return await body(client)

    return asyncio.run(main())


@pytest.mark.parametrize("engine", ["sdxl", "sd"])
def test_local_server_generate_matches_the_sync_client(octoai_server: Any, engine: str) -> None:
    from dagster_octoai.api.client import OctoAIClient

    request = {"prompt": "a red fox", "seed": [3, 4], "num_images": 2}
    ours = run_local(octoai_server, lambda c: c.generate(request, engine=engine))
    with OctoAIClient(LOCAL_TOKEN, base_url=octoai_server.url) as sync_client:
        theirs = sync_client.generate(request, engine=engine)
    assert ours.seeds == [3, 4]
    assert [i.data for i in ours.images] == [i.data for i in theirs.images]


def test_local_server_submit_poll_fetch_wait(octoai_server_factory: Any) -> None:
    server = octoai_server_factory(async_queue_delay_s=0.2)

    async def body(client: AsyncOctoAIClient) -> Any:
        jobs = [await client.submit({"prompt": "fox", "engine": "sd", "seed": s}) for s in range(3)]
        first = await client.poll(jobs[0])
        waited = await asyncio.gather(
            *(client.wait(j, timeout=20, poll_interval_s=0.05) for j in jobs)
        )
        fetched = await client.fetch(jobs[1])
        return jobs, first, waited, fetched

    jobs, first, waited, fetched = run_local(server, body)
    assert first.status in (JobStatus.PENDING, JobStatus.RUNNING)
    assert [w.seeds for w in waited] == [[0], [1], [2]]
    assert [w.call_info.response_id for w in waited] == [j.response_id for j in jobs]
    assert fetched.images[0].data == waited[1].images[0].data
    assert server.stats()["async_jobs"]["submitted"] == 3


def test_local_server_batch_never_exceeds_replicas(octoai_server_factory: Any) -> None:
    server = octoai_server_factory(latency_per_image_s=0.1, replicas=3)

    async def body(client: AsyncOctoAIClient) -> list[Any]:
        return await client.generate_many(
            [{"prompt": "fox", "engine": "sd", "seed": s} for s in range(9)]
        )

    results = run_local(server, body, max_concurrency=3)
    assert [r.seeds for r in results] == [[s] for s in range(9)]
    stats = server.stats()
    assert stats["in_flight_max"] == 3
    assert stats["queued_max"] == 0


def test_local_server_failed_and_expired_jobs(octoai_server_factory: Any) -> None:
    from dagster_octoai.server import FaultConfig

    server = octoai_server_factory(
        faults=FaultConfig(job_failure=1.0, job_failure_after_s=0.05), result_ttl_s=0.3
    )

    async def failing(client: AsyncOctoAIClient) -> None:
        job = await client.submit({"prompt": "fox", "engine": "sd"})
        await client.wait(job, timeout=20, poll_interval_s=0.05)

    with pytest.raises(errors.JobFailedError):
        run_local(server, failing)

    server.configure(faults=FaultConfig())

    async def expiring(client: AsyncOctoAIClient) -> None:
        job = await client.submit({"prompt": "fox", "engine": "sd"})
        await client.wait(job, timeout=20, poll_interval_s=0.05)
        await asyncio.sleep(0.6)
        await client.fetch(job)

    with pytest.raises(errors.JobExpiredError):
        run_local(server, expiring)


def test_every_answer_carries_the_request_that_produced_it(server: ScriptedServer) -> None:
    rurl = f"{server.url}/v1/responses/j2"
    asked = {"prompt": "a red fox", "seed": 3}

    async def body(client: AsyncOctoAIClient) -> Any:
        server.default = ok([3])
        one = await client.generate(asked, engine="sd")
        many = await client.generate_many([{**asked, "seed": s} for s in (1, 2)])
        streamed = [r async for _, r in client.iter_generate([asked])]
        server.script(
            Reply(201, {"response_id": "j2", "poll_url": f"{server.url}/v1/requests/j2"}),
            Reply(200, {"status": "completed", "response_url": rurl}),
            ok([3]),
            Reply(200, {"status": "completed", "response_url": rurl}),
            ok([3]),
            ok([3]),
        )
        job = await client.submit(asked)
        waited = await client.wait(job, timeout=10, poll_interval_s=0.02)
        fetched = await client.fetch(job)
        bare = await client.fetch(rurl)
        return job, one, many, streamed, waited, fetched, bare

    job, one, many, streamed, waited, fetched, bare = run(server, body)
    assert one.request.engine.value == "sd" and one.images[0].request == one.request
    assert [r.request.seed for r in many] == [1, 2]
    assert streamed[0].request.prompt == "a red fox"
    for answer in (waited, fetched):
        assert answer.request == job.request and answer.response_id == "j2"
        assert answer.images[0].response_id == "j2"
    assert bare.request is None and bare.response_id is None
