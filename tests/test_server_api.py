"""The local server's routes and errors, through real HTTP on loopback."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from dagster_octoai.api.images import image_size, sniff_format
from dagster_octoai.server import FaultConfig, LocalOctoAIServer
from dagster_octoai.testing.server import sample_image_b64

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., LocalOctoAIServer]


@pytest.fixture
def client(octoai_server: LocalOctoAIServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {octoai_server.token}"}
    with httpx.Client(base_url=octoai_server.url, headers=headers, timeout=30) as c:
        yield c


def _images(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "prediction_time_ms"}
    assert body["prediction_time_ms"] >= 0
    images: list[dict[str, Any]] = body["images"]
    return images


def _bytes(image: dict[str, Any]) -> bytes:
    return base64.b64decode(image["image_b64"], validate=True)


def _wait_status(
    client: httpx.Client, poll_url: str, want: str, timeout_s: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        answer: dict[str, Any] = client.get(poll_url).json()
        if answer["status"] == want:
            return answer
        assert time.monotonic() < deadline, f"still {answer} after {timeout_s} s"
        time.sleep(0.02)


# ---- generate ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "size"),
    [("sd", (512, 512)), ("sdxl", (1024, 1024))],
)
def test_generate_default_size_and_jpeg(
    client: httpx.Client, engine: str, size: tuple[int, int]
) -> None:
    images = _images(client.post(f"/generate/{engine}", json={"prompt": "a red fox", "seed": 5}))
    assert len(images) == 1
    image = images[0]
    assert image["seed"] == 5
    assert image["removed_for_safety"] is False
    assert 0 <= image["safety_score"] < 0.5
    data = _bytes(image)
    assert sniff_format(data) == "jpeg"
    assert image_size(data) == size


def test_generate_honours_size_count_seeds_and_png(client: httpx.Client) -> None:
    body = {
        "prompt": "a lighthouse",
        "width": 768,
        "height": 512,
        "num_images": 3,
        "seed": [11, None, 13],
        "image_encoding": "png",
    }
    images = _images(client.post("/generate/sd", json=body))
    assert [im["seed"] for im in images][0::2] == [11, 13]
    assert 0 <= images[1]["seed"] < 2**32
    for image in images:
        data = _bytes(image)
        assert sniff_format(data) == "png"
        assert image_size(data) == (768, 512)
    assert len({_bytes(im) for im in images}) == 3


def test_one_seed_for_several_images_gives_consecutive_seeds(client: httpx.Client) -> None:
    images = _images(client.post("/generate/sd", json={"prompt": "x", "num_images": 2, "seed": 41}))
    assert [im["seed"] for im in images] == [41, 42]


def test_null_seed_picks_random_seeds_and_reports_them(client: httpx.Client) -> None:
    first = _images(client.post("/generate/sd", json={"prompt": "dice", "num_images": 2}))
    second = _images(client.post("/generate/sd", json={"prompt": "dice", "seed": None}))
    seeds = [im["seed"] for im in first + second]
    assert all(0 <= s < 2**32 for s in seeds)
    assert len(set(seeds)) == 3
    # The reported seed reproduces the image.
    again = _images(client.post("/generate/sd", json={"prompt": "dice", "seed": seeds[2]}))
    assert _bytes(again[0]) == _bytes(second[0])


def test_same_request_and_seed_give_the_same_bytes(client: httpx.Client) -> None:
    body = {"prompt": "a teapot", "seed": 1234, "steps": 20}
    a = _bytes(_images(client.post("/generate/sd", json=body))[0])
    b = _bytes(_images(client.post("/generate/sd", json=body))[0])
    c = _bytes(_images(client.post("/generate/sd", json={**body, "seed": 1235}))[0])
    d = _bytes(_images(client.post("/generate/sd", json={**body, "prompt": "a kettle"}))[0])
    assert a == b
    assert len({a, c, d}) == 3


@pytest.mark.parametrize("engine", ["controlnet-sdxl", "controlnet-sd15", "controlnet-sd"])
def test_controlnet_engines_and_alias(client: httpx.Client, engine: str) -> None:
    size = (1024, 1024) if engine == "controlnet-sdxl" else (512, 512)
    body = {
        "prompt": "a house",
        "controlnet": "octoai:canny_sdxl" if engine.endswith("sdxl") else "octoai:canny_sd15",
        "controlnet_image": sample_image_b64(size, "edges"),
        "seed": 3,
    }
    images = _images(client.post(f"/generate/{engine}", json=body))
    assert image_size(_bytes(images[0])) == size


def test_safety_trigger_word_removes_images(client: httpx.Client) -> None:
    images = _images(
        client.post("/generate/sd", json={"prompt": "nsfw cat", "num_images": 2, "seed": 9})
    )
    assert [im["removed_for_safety"] for im in images] == [True, True]
    assert [im["image_b64"] for im in images] == [None, None]
    assert [im["seed"] for im in images] == [9, 10]
    assert all(im["safety_score"] > 0.5 for im in images)


def test_paid_generations_count_rendered_images(
    octoai_server: LocalOctoAIServer, client: httpx.Client
) -> None:
    before = octoai_server.stats()
    client.post("/generate/sd", json={"prompt": "x", "num_images": 3, "seed": 1})
    client.post("/generate/sd", json={"prompt": "x", "steps": 0})  # refused: not paid
    after = octoai_server.stats()
    assert after["paid_generations"] - before["paid_generations"] == 3
    assert after["generation_requests"] - before["generation_requests"] == 1
    assert after["validation_errors"] - before["validation_errors"] == 1


# ---- errors ----------------------------------------------------------------------------------


def test_unknown_key_and_out_of_range_values_are_422_per_field(client: httpx.Client) -> None:
    r = client.post(
        "/generate/sdxl", json={"prompt": "x", "steps": 500, "cfg_scale": 0, "colour": "red"}
    )
    assert r.status_code == 422
    detail = r.json()["detail"]
    by_loc = {tuple(d["loc"]): d for d in detail}
    assert set(by_loc) == {("body", "steps"), ("body", "cfg_scale"), ("body", "colour")}
    assert by_loc[("body", "colour")]["type"] == "extra_forbidden"
    assert all(isinstance(d["msg"], str) and d["msg"] for d in detail)


def test_engine_rules_are_422(client: httpx.Client) -> None:
    r = client.post(
        "/generate/sd", json={"prompt": "x", "width": 1024, "height": 1024, "prompt_2": "y"}
    )
    assert r.status_code == 422
    locs = {tuple(d["loc"]) for d in r.json()["detail"]}
    assert {("body", "width"), ("body", "prompt_2")} <= locs
    r = client.post("/generate/controlnet-sdxl", json={"prompt": "x"})
    assert r.status_code == 422
    assert {("body", "controlnet"), ("body", "controlnet_image")} <= {
        tuple(d["loc"]) for d in r.json()["detail"]
    }


def test_a_path_is_not_accepted_as_an_image(client: httpx.Client, tmp_path: Any) -> None:
    path = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(path)
    r = client.post("/generate/sd", json={"prompt": "x", "init_image": str(path)})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "init_image"]


def test_invalid_json_and_non_object_bodies_are_422(client: httpx.Client) -> None:
    r = client.post(
        "/generate/sd", content=b'{"prompt": ', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"
    r = client.post("/generate/sd", json=["prompt"])
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body"]


def test_engine_in_the_body_is_an_unknown_key(client: httpx.Client) -> None:
    r = client.post("/generate/sd", json={"prompt": "x", "engine": "sdxl"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "engine"]


def test_banned_word_is_the_policy_400(client: httpx.Client) -> None:
    r = client.post("/generate/sdxl", json={"prompt": "something Forbidden here"})
    assert r.status_code == 400
    assert r.json() == {"message": "This request violates our Acceptable Use Policy."}
    # A word containing the banned one is fine.
    assert (
        client.post("/generate/sd", json={"prompt": "unforbiddenly", "seed": 1}).status_code == 200
    )


def test_unknown_engine_is_404(client: httpx.Client) -> None:
    r = client.post("/generate/sd9", json={"prompt": "x"})
    assert r.status_code == 404
    assert "sd9" in r.json()["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dGVzdA=="},
        {"Authorization": "Bearer"},
    ],
)
def test_missing_or_invalid_token_is_401(
    octoai_server: LocalOctoAIServer, headers: dict[str, str]
) -> None:
    r = httpx.post(f"{octoai_server.url}/generate/sd", json={"prompt": "x"}, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "message" in r.json()
    assert "test-token-0c7f3e9a" not in r.text
    for path in ("/v1/requests/abc", "/v1/responses/abc", "/_local/stats"):
        assert httpx.get(f"{octoai_server.url}{path}", headers=headers).status_code == 401


def test_forbidden_token_is_403_and_a_public_server_accepts_any(
    octoai_server_factory: Factory,
) -> None:
    srv = octoai_server_factory(token=None, public=True, forbidden_tokens=["blocked-token"])
    url = f"{srv.url}/generate/sd"
    body = {"prompt": "x", "seed": 1}
    assert (
        httpx.post(url, json=body, headers={"Authorization": "Bearer anything"}).status_code == 200
    )
    r = httpx.post(url, json=body, headers={"Authorization": "Bearer blocked-token"})
    assert r.status_code == 403
    assert "blocked-token" not in r.text
    assert httpx.post(url, json=body).status_code == 401


def test_every_answer_carries_a_request_id(
    octoai_server: LocalOctoAIServer, client: httpx.Client
) -> None:
    answers = [
        client.post("/generate/sd", json={"prompt": "x", "seed": 1}),
        client.post("/generate/sd", json={"prompt": "x", "steps": -1}),
        client.post("/generate/nope", json={"prompt": "x"}),
        client.get("/v1/requests/unknown"),
        client.get("/healthcheck"),
        client.get("/no/such/route"),
        httpx.post(f"{octoai_server.url}/generate/sd", json={"prompt": "x"}),
    ]
    ids = [a.headers.get("x-user-request-id") for a in answers]
    assert all(ids), ids
    assert len(set(ids)) == len(ids)


def test_healthcheck_and_unrouted_paths(client: httpx.Client) -> None:
    assert client.get("/healthcheck").status_code == 200
    r = client.get("/no/such/route")
    assert r.status_code == 404
    assert r.json() == {"message": "Not Found"}
    assert client.get("/generate/sd").status_code == 405


# ---- async ----------------------------------------------------------------------------------


def test_async_submit_poll_fetch(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(latency_per_image_s=0.3, replicas=1)
    headers = {"Authorization": f"Bearer {srv.token}"}
    with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as client:
        # Occupy the only replica so the job has to wait: it is seen pending first.
        blocker = client.post(
            "/generate/sd",
            json={"prompt": "blocker", "seed": 1},
            headers={"X-OctoAI-Async": "1"},
        )
        r = client.post(
            "/generate/sd",
            json={"prompt": "a fox", "seed": 7, "num_images": 2},
            headers={"X-OctoAI-Async": "1"},
        )
        assert blocker.status_code == 201
        assert r.status_code == 201
        accepted = r.json()
        assert set(accepted) == {"response_id", "poll_url"}
        assert accepted["poll_url"] == f"{srv.url}/v1/requests/{accepted['response_id']}"
        first = client.get(accepted["poll_url"]).json()
        assert first["status"] == "pending"
        early = client.get(f"/v1/responses/{accepted['response_id']}")
        assert early.status_code == 409
        _wait_status(client, accepted["poll_url"], "running")
        done = _wait_status(client, accepted["poll_url"], "completed")
        assert done["response_url"] == f"{srv.url}/v1/responses/{accepted['response_id']}"
        images = _images(client.get(done["response_url"]))
        assert [im["seed"] for im in images] == [7, 8]
        sync = _images(
            client.post("/generate/sd", json={"prompt": "a fox", "seed": 7, "num_images": 2})
        )
        assert [_bytes(im) for im in images] == [_bytes(im) for im in sync]
    stats = srv.stats()
    assert stats["async_jobs"]["submitted"] == 2
    assert stats["async_jobs"]["completed"] == 2
    assert stats["paid_generations"] == 1 + 2 + 2


def test_async_urls_use_the_public_base_url(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(public_base_url="https://octo.example.test/base/")
    r = httpx.post(
        f"{srv.url}/generate/sd",
        json={"prompt": "x"},
        headers={"Authorization": f"Bearer {srv.token}", "X-OctoAI-Async": "1"},
    )
    assert r.json()["poll_url"].startswith("https://octo.example.test/base/v1/requests/")


def test_async_results_expire(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(result_ttl_s=0.4)
    headers = {"Authorization": f"Bearer {srv.token}"}
    with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as client:
        accepted = client.post(
            "/generate/sd", json={"prompt": "x", "seed": 1}, headers={"X-OctoAI-Async": "1"}
        ).json()
        done = _wait_status(client, accepted["poll_url"], "completed")
        assert client.get(done["response_url"]).status_code == 200
        deadline = time.monotonic() + 10
        while client.get(accepted["poll_url"]).status_code != 404:
            assert time.monotonic() < deadline, "the result never expired"
            time.sleep(0.05)
        gone = client.get(done["response_url"])
        assert gone.status_code == 404
        assert "expired" in gone.json()["message"]
    stats = srv.stats()
    assert stats["async_jobs"]["expired"] == 1
    assert stats["async_jobs"]["completed"] == 0


def test_unknown_response_id_is_404(client: httpx.Client) -> None:
    assert client.get("/v1/requests/no-such-id").status_code == 404
    assert client.get("/v1/responses/no-such-id").status_code == 404


def test_async_body_over_the_limit_is_413(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory(async_body_limit_bytes=2000)
    headers = {"Authorization": f"Bearer {srv.token}"}
    body = {"prompt": "x" * 3000}
    r = httpx.post(f"{srv.url}/generate/sd", json=body, headers={**headers, "X-OctoAI-Async": "1"})
    assert r.status_code == 413
    assert "2000" in r.json()["message"]
    # The limit is for async bodies only.
    assert (
        httpx.post(f"{srv.url}/generate/sd", json=body, headers=headers, timeout=30).status_code
        == 200
    )


def test_async_validation_errors_come_at_submit(client: httpx.Client) -> None:
    r = client.post(
        "/generate/sd", json={"prompt": "x", "steps": 0}, headers={"X-OctoAI-Async": "1"}
    )
    assert r.status_code == 422


# ---- OpenAPI and controls --------------------------------------------------------------------


def test_openapi_document_lists_the_routes_and_engine_schemas(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert doc["servers"] == [{"url": str(client.base_url).rstrip("/")}]
    for engine in ("sdxl", "sd", "controlnet-sdxl", "controlnet-sd15", "controlnet-sd"):
        assert f"/generate/{engine}" in doc["paths"]
    assert {"/v1/requests/{response_id}", "/v1/responses/{response_id}", "/healthcheck"} <= set(
        doc["paths"]
    )
    schemas = doc["components"]["schemas"]
    sd = schemas["ImageGenerationRequest_sd"]
    assert sd["additionalProperties"] is False
    assert "prompt_2" not in sd["properties"] and "controlnet" not in sd["properties"]
    cn = schemas["ImageGenerationRequest_controlnet-sdxl"]
    assert set(cn["required"]) == {"prompt", "controlnet", "controlnet_image"}
    assert "prompt_2" in cn["properties"]


def test_local_config_changes_and_validates(octoai_server_factory: Factory) -> None:
    srv = octoai_server_factory()
    srv.configure(banned_words=["teapot"], faults={"error_503": 0.0})
    headers = {"Authorization": f"Bearer {srv.token}"}
    r = httpx.post(f"{srv.url}/generate/sd", json={"prompt": "a teapot"}, headers=headers)
    assert r.status_code == 400
    srv.configure(faults=FaultConfig(error_500=1.0))
    assert (
        httpx.post(f"{srv.url}/generate/sd", json={"prompt": "x"}, headers=headers).status_code
        == 500
    )
    assert srv.config.faults.error_500 == 1.0
    with pytest.raises(ValueError, match="replicas"):
        srv.configure(replicas=0)
    admin = {"Authorization": f"Bearer {srv.admin_token}"}
    r = httpx.post(f"{srv.url}/_local/config", json={"replicas": 0}, headers=admin)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "replicas"]
    shown = httpx.get(f"{srv.url}/_local/config", headers=admin).json()
    assert shown["banned_words"] == ["teapot"]
    assert srv.token is not None and srv.admin_token is not None
    assert "token" not in shown and srv.token not in str(shown)
    assert srv.admin_token not in str(shown)
