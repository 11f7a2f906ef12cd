"""A request's cost is bounded, a 500 closes its connection, and the client carries on.

Issue 20's attacks on the placeholder backend (the diffusers ones are in
tests/diffusion/test_hostile_requests.py): 16 images x 200 steps with the refiner is
refused before anything queues (sync and async), the seed's examples are admitted, the
limits are the operator's; an unhandled error answers 500 with ``Connection: close`` and
the same client's next request succeeds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dagster_octoai import HTTPRetryPolicy
from dagster_octoai.api.client import OctoAIClient
from dagster_octoai.api.models import ImageGenerationRequest
from dagster_octoai.server import LocalOctoAIServer, ServerConfig
from dagster_octoai.server.budget import megapixel_steps, over_budget

pytestmark = pytest.mark.timeout(120)

TOKEN = "budget-token-4c2e"
SEEDS = Path("/work/shared/seeds/image-gen-rest-api.txt")
HEAVY = {"prompt": "x", "num_images": 16, "steps": 200, "use_refiner": True,
         "loras": {"a": 1.0, "b": 1.0}}  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[LocalOctoAIServer]:
    with LocalOctoAIServer(ServerConfig(token=TOKEN)) as srv:
        yield srv


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_sixteen_images_of_200_steps_with_the_refiner_are_refused_sync_and_async(
    server: LocalOctoAIServer,
) -> None:
    before = server.stats()
    for headers in (_auth(), {**_auth(), "X-OctoAI-Async": "1"}):
        r = httpx.post(f"{server.url}/generate/sdxl", json=HEAVY, headers=headers, timeout=30)
        assert r.status_code == 422, r.text
        (detail,) = r.json()["detail"]
        assert "num_images x steps x megapixels" in detail["msg"]
        assert "refiner" in detail["msg"] and "use_refiner" in detail["msg"]
    after = server.stats()
    assert after["paid_generations"] == before["paid_generations"]
    assert after["async_jobs"] == before["async_jobs"]


def _seed_worst_case() -> dict[str, Any]:
    """The largest of each number the seed's examples give, all in one request."""
    values: dict[str, int] = {}
    for name, value in re.findall(r'"(num_images|steps|width|height)":\s*(\d+)', SEEDS.read_text()):
        values[name] = max(values.get(name, 0), int(value))
    return {**values, "use_refiner": True}


def test_the_default_budget_admits_every_example_of_the_seed(server: LocalOctoAIServer) -> None:
    if not SEEDS.is_file():
        pytest.skip("the seed documents are not on this machine")
    worst = _seed_worst_case()
    assert worst["num_images"] >= 2 and worst["steps"] >= 20 and worst["width"] >= 1024
    request = ImageGenerationRequest.model_validate({"prompt": "x", **worst})
    assert over_budget(request, ServerConfig(token=TOKEN)) == [], megapixel_steps(request)
    r = httpx.post(f"{server.url}/generate/sdxl", json={"prompt": "x", **worst},
                   headers=_auth(), timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text


def test_the_operator_sets_the_limits_and_a_422_names_the_fields() -> None:
    config = ServerConfig(token=TOKEN, max_images=2, max_steps=10, max_megapixel_steps=5)
    request = ImageGenerationRequest.model_validate(
        {"prompt": "x", "engine": "sd", "num_images": 3, "steps": 20}
    )
    problems = dict(over_budget(request, config))
    assert "allows at most 2" in problems[("num_images",)]
    assert "allows at most 10" in problems[("steps",)]
    assert "16 megapixel-steps" in problems[()]  # 3 x 20 x 0.26 MP (512 x 512), no refiner
    small = ImageGenerationRequest.model_validate({"prompt": "x", "engine": "sd", "steps": 10})
    assert over_budget(small, config) == []


def test_a_500_closes_its_connection_and_the_next_request_on_the_client_succeeds(
    server: LocalOctoAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server._server is not None
    state = server._server.config.app.state.octoai
    calls: list[int] = []
    original = state.backend.render

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    monkeypatch.setattr(state.backend, "render", fail_once)
    body = {"prompt": "x", "seed": 1}
    with httpx.Client(base_url=server.url, headers=_auth(), timeout=30) as client:
        failed = client.post("/generate/sd", json=body)
        assert failed.status_code == 500
        assert failed.headers["connection"] == "close"
        for _ in range(20):
            assert client.post("/generate/sd", json=body).status_code == 200
    # The package's client, no retries allowed: after the 500 its pooled connection is
    # gone (Connection: close), and the next request opens a new one.
    calls.clear()
    with OctoAIClient(TOKEN, base_url=server.url, retry=HTTPRetryPolicy(max_attempts=1)) as c:
        with pytest.raises(Exception, match="500"):
            c.generate(ImageGenerationRequest(prompt="x", engine="sd", seed=1))
        assert len(c.generate(ImageGenerationRequest(prompt="x", engine="sd", seed=1)).images) == 1
