"""The OpenAPI document says what the server does: checked against the live server."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image

from dagster_octoai.server import LocalOctoAIServer
from dagster_octoai.testing.server import sample_image_b64

pytestmark = pytest.mark.timeout(180)

ENGINES = ("sdxl", "sd", "controlnet-sdxl", "controlnet-sd15", "controlnet-sd")
EDGES_1024 = sample_image_b64((1024, 1024), "edges")
EDGES_512 = sample_image_b64((512, 512), "edges")


def _controlnet(engine: str) -> dict[str, Any]:
    if not engine.startswith("controlnet"):
        return {}
    image = EDGES_1024 if engine == "controlnet-sdxl" else EDGES_512
    return {"controlnet": "octoai:canny", "controlnet_image": image}


@pytest.fixture(scope="module")
def document(octoai_server: LocalOctoAIServer) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{octoai_server.url}/openapi.json").json()
    return doc


@pytest.fixture
def client(octoai_server: LocalOctoAIServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {octoai_server.token}"}
    with httpx.Client(base_url=octoai_server.url, headers=headers, timeout=60) as c:
        yield c


def _validator(document: dict[str, Any], engine: str) -> Any:
    op = document["paths"][f"/generate/{engine}"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[1]
    schema = {**document["components"]["schemas"][name], "components": document["components"]}
    return jsonschema_rs.Draft202012Validator(schema)


BODIES = [
    # (engine, body, the server accepts it)
    ("sd", {"prompt": "x"}, True),
    ("sd", {"prompt": "x", "width": 512, "height": 768}, True),
    ("sd", {"prompt": "x", "width": 768, "height": 768}, False),
    ("sd", {"prompt": "x", "width": 512}, False),
    ("sd", {"prompt": "x", "width": None, "height": None}, True),
    ("sd", {"prompt": "x", "prompt_2": "y"}, False),
    ("sd", {"prompt": "x", "style_preset": "anime"}, False),
    ("sdxl", {"prompt": "x", "style_preset": "anime", "width": 1536, "height": 640}, True),
    ("sdxl", {"prompt": "x", "style_preset": "no such style"}, False),
    ("sdxl", {"prompt": "x", "width": 512, "height": 512}, False),
    ("sdxl", {"prompt": "x", "seed": [1, None], "num_images": 2}, True),
    ("sdxl", {"prompt": "x", "seed": [1, 2]}, False),
    ("sdxl", {"prompt": "x", "seed": [7]}, True),
    ("sdxl", {"prompt": "x", "seed": 2**32}, False),
    ("sdxl", {"prompt": "x", "steps": 0}, False),
    ("sdxl", {"prompt": "x", "colour": "red"}, False),
    ("sdxl", {"prompt": ""}, False),
    (
        "sdxl",
        {"prompt": "x", "checkpoint": "octoai:crystal-clear", "loras": {"octoai:a": 0.5}},
        True,
    ),
    ("sdxl", {"prompt": "x", "checkpoint": "not a name!"}, False),
    ("sdxl", {"prompt": "x", "image_encoding": "PNG"}, True),
    ("sdxl", {"prompt": "x", "image_encoding": "gif"}, False),
    ("sdxl", {"prompt": "x", "init_image": "not base64!"}, False),
    ("sdxl", {"prompt": "x", "controlnet": "octoai:canny"}, False),
    ("controlnet-sdxl", {"prompt": "x"}, False),
    ("controlnet-sdxl", {"prompt": "x", **_controlnet("controlnet-sdxl")}, True),
    ("controlnet-sd", {"prompt": "x", **_controlnet("controlnet-sd")}, True),
    ("controlnet-sd15", {"prompt": "x", "prompt_2": "y", **_controlnet("controlnet-sd15")}, False),
]


@pytest.mark.parametrize(("engine", "body", "accepted"), BODIES)
def test_schema_and_server_agree(
    document: dict[str, Any],
    client: httpx.Client,
    engine: str,
    body: dict[str, Any],
    accepted: bool,
) -> None:
    schema_says = _validator(document, engine).is_valid(body)
    status = client.post(f"/generate/{engine}", json=body).status_code
    assert status == (200 if accepted else 422)
    assert schema_says == accepted


def test_a_corrupt_image_is_422_not_a_crash(client: httpx.Client) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="JPEG")
    truncated = base64.b64encode(buf.getvalue()[:200]).decode()
    r = client.post("/generate/sd", json={"prompt": "x", "init_image": truncated})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "init_image"]
    r = client.post(
        "/generate/sd", json={"prompt": "x", "transfer_images": {"sks": [EDGES_512, truncated]}}
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "transfer_images", "sks", 1]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES[:4])  # controlnet-sd shares controlnet-sd15's schema
def test_schemathesis_generates_requests_the_server_answers_as_documented(
    document: dict[str, Any], octoai_server: LocalOctoAIServer, engine: str
) -> None:
    schema = schemathesis.openapi.from_dict(document)
    operation = schema[f"/generate/{engine}"]["POST"]
    documented = {
        int(code) for code in document["paths"][f"/generate/{engine}"]["post"]["responses"]
    }
    headers = {"Authorization": f"Bearer {octoai_server.token}"}
    seen: list[int] = []

    @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        r = httpx.request(
            "POST",
            f"{octoai_server.url}/generate/{engine}",
            json=case.body,
            headers={**(case.headers or {}), **headers},
            timeout=60,
        )
        seen.append(r.status_code)
        assert r.status_code in documented
        assert r.status_code < 500

    check()
    assert seen
