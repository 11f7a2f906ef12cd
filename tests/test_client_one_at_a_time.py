"""Batches at ``max_concurrency=1``: generated on the caller's thread, one at a time,
with the same laziness and error rules as the pooled path."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from _scripted_server import (
    Recorded,
    Reply,
    ScriptedServer,
    generation_body,
    module_scripted_server,
    server,
)

from dagster_octoai.api import errors
from dagster_octoai.api.client import HTTPRetryPolicy, OctoAIClient

__all__ = ["module_scripted_server", "server"]

TOKEN = "sk-test-SECRET-one-at-a-time"
POLICY = {"message": "Request violates the acceptable use policy"}


def _by_seed(request: Recorded) -> Reply:
    seed = request.json()["seed"]
    if seed == 2:
        return Reply(400, POLICY)
    return Reply(200, generation_body([seed]))


@pytest.fixture
def client(server: ScriptedServer) -> Iterator[OctoAIClient]:
    server.default = _by_seed
    with OctoAIClient(TOKEN, base_url=server.url, retry=HTTPRetryPolicy.none()) as client:
        yield client


def test_one_at_a_time_is_lazy_in_order_and_on_the_callers_thread(
    server: ScriptedServer, client: OctoAIClient
) -> None:
    pulled: list[int] = []

    def requests() -> Iterator[dict[str, Any]]:
        for seed in (0, 1, 3, 4):
            pulled.append(seed)
            yield {"prompt": "fox", "seed": seed}

    before = threading.active_count()
    stream = client.iter_generate(requests(), max_concurrency=1)
    index, response = next(stream)
    assert (index, response.seeds, pulled) == (0, [0], [0])  # nothing pulled ahead
    assert threading.active_count() == before  # no pool thread was started
    rest = list(stream)
    assert [(i, r.seeds) for i, r in rest] == [(1, [1]), (2, [3]), (3, [4])]
    assert [r.json()["seed"] for r in server.requests] == [0, 1, 3, 4]
    assert server.max_in_flight == 1


def test_one_at_a_time_stops_at_the_first_error(
    server: ScriptedServer, client: OctoAIClient
) -> None:
    batch = [{"prompt": "fox", "seed": s} for s in range(5)]
    with pytest.raises(errors.PolicyViolationError):
        client.generate_many(batch, max_concurrency=1)
    assert [r.json()["seed"] for r in server.requests] == [0, 1, 2]  # nothing after it


def test_one_at_a_time_return_exceptions_goes_on(
    server: ScriptedServer, client: OctoAIClient
) -> None:
    batch = [{"prompt": "fox", "seed": s} for s in range(4)]
    results = client.generate_many(batch, max_concurrency=1, return_exceptions=True)
    assert isinstance(results[2], errors.PolicyViolationError)
    assert [r.seeds for r in results if not isinstance(r, Exception)] == [[0], [1], [3]]
    # A bad request is this package's error too: named, and nothing sent for it.
    server.reset()
    server.default = _by_seed
    results = client.generate_many(
        [{"prompt": "fox", "seed": 0}, {"prompt": "fox", "steps": -1}],
        max_concurrency=1,
        return_exceptions=True,
    )
    assert isinstance(results[1], errors.RequestValidationError) and "steps" in str(results[1])
    assert len(server.requests) == 1


def test_a_client_of_one_slot_batches_one_at_a_time(server: ScriptedServer) -> None:
    server.default = _by_seed
    with OctoAIClient(TOKEN, base_url=server.url, max_concurrency=1) as client:
        results = client.generate_many([{"prompt": "fox", "seed": s} for s in (5, 6, 7)])
    assert [r.seeds for r in results] == [[5], [6], [7]]
    assert server.max_in_flight == 1
