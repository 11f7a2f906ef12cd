"""P1: the client's own CPU cost per sync generation, against raw httpx and the official SDK.

The server runs in another process in instant mode, so the client process's CPU time
(``getrusage``: user + system, all threads) is the client's work alone: building and
validating the request, HTTP, parsing the answer, decoding the base64 image.

Size: the issue asks for 256x256, which no engine of the API accepts (SD 1.5's smallest
is 512x512, SDXL's sizes are all about one megapixel), and the product client refuses
it before sending. The official ``octoai`` 1.11.0 SDK can only call ``sdxl`` of the
SD family (it has no SD 1.5 method), so the three-way comparison runs on SDXL at
1024x1024 (an 87 KB JPEG); a second row compares the product client with raw httpx on
SD 1.5 at 512x512 (a 32 KB JPEG), the closest valid size to the issue's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
from octoai.client import OctoAI
from octoai.environment import OctoAIEnvironment

from dagster_octoai.api.client import OctoAIClient

from ._common import TOKEN, Row, Settings, cpu_seconds, octoai_server

PROMPT = "a red fox in the snow, studio light"
WARMUP = 20


def _body(engine: str, i: int) -> dict[str, Any]:
    size = 1024 if engine == "sdxl" else 512
    return {"prompt": PROMPT, "width": size, "height": size, "steps": 20, "seed": i}


def _product(url: str, engine: str) -> tuple[Callable[[int], int], Callable[[], None]]:
    client = OctoAIClient(TOKEN, base_url=url, max_concurrency=1)

    def one(i: int) -> int:
        response = client.generate(_body(engine, i), engine=engine)
        return len(response.images[0].data)

    return one, client.close


def _raw_httpx(url: str, engine: str) -> tuple[Callable[[int], int], Callable[[], None]]:
    # One persistent connection, the same JSON, the same base64 decode: the floor.
    http = httpx.Client(
        base_url=url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        timeout=60.0,
    )

    def one(i: int) -> int:
        response = http.post(
            f"/generate/{engine}",
            content=json.dumps(_body(engine, i), separators=(",", ":")).encode(),
            headers={"Content-Type": "application/json"},
        )
        response.raise_for_status()
        return len(base64.b64decode(response.json()["images"][0]["image_b64"]))

    return one, http.close


def _sdk(url: str, engine: str) -> tuple[Callable[[int], int], Callable[[], None]]:
    assert engine == "sdxl", "the octoai 1.11.0 SDK has no SD 1.5 method"
    env = OctoAIEnvironment(default=url, image_gen=url, text_gen=url)
    sdk = OctoAI(api_key=TOKEN, environment=env, timeout=60)

    def one(i: int) -> int:
        body = _body(engine, i)
        response = sdk.image_gen.generate_sdxl(**body)
        b64 = response.images[0].image_b64
        assert b64 is not None
        return len(base64.b64decode(b64))

    return one, lambda: None


_CLIENTS = {"product": _product, "httpx": _raw_httpx, "sdk": _sdk}


def _cpu_per_request(one: Callable[[int], int], count: int) -> float:
    for i in range(min(WARMUP, count)):
        one(i)
    started = cpu_seconds()
    for i in range(count):
        one(i)
    return (cpu_seconds() - started) / count


def _measure(
    url: str, engine: str, names: list[str], count: int, reps: int
) -> dict[str, list[float]]:
    """CPU seconds per request of each client, repetitions interleaved (noise hits all alike)."""
    out: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            one, close = _CLIENTS[name](url, engine)
            try:
                out[name].append(_cpu_per_request(one, count))
            finally:
                close()
    return out


def run(settings: Settings) -> list[Row]:
    count = settings.n(500, 10)
    reps = settings.reps
    with octoai_server() as server:
        sdxl = _measure(server.url, "sdxl", ["product", "httpx", "sdk"], count, reps)
        sd = _measure(server.url, "sd", ["product", "httpx"], count, reps)

    def ms(values: list[float]) -> list[float]:
        return [round(v * 1000, 3) for v in values]

    common = f"{count} sequential sync generations x {reps} reps, instant server in another process"
    vs_httpx = [p / h for p, h in zip(sdxl["product"], sdxl["httpx"], strict=True)]
    vs_sdk = [p / s for p, s in zip(sdxl["product"], sdxl["sdk"], strict=True)]
    sdk_vs_httpx = [s / h for s, h in zip(sdxl["sdk"], sdxl["httpx"], strict=True)]
    sd_vs_httpx = [p / h for p, h in zip(sd["product"], sd["httpx"], strict=True)]
    details = {
        "cpu_ms_per_request_product": ms(sdxl["product"]),
        "cpu_ms_per_request_httpx": ms(sdxl["httpx"]),
        "cpu_ms_per_request_sdk": ms(sdxl["sdk"]),
        "sdk_over_httpx": [round(v, 3) for v in sdk_vs_httpx],
    }
    return [
        Row(
            id="P1",
            scenario=f"client CPU per request, SDXL 1024x1024 ({common})",
            baseline="raw httpx, one persistent connection",
            figure="product CPU / raw httpx CPU",
            unit="x",
            samples=vs_httpx,
            target=1.15,
            details=details,
        ),
        Row(
            id="P1-sdk",
            scenario=f"client CPU per request, SDXL 1024x1024 ({common})",
            baseline="official octoai 1.11.0 SDK (generate_sdxl)",
            figure="product CPU / SDK CPU",
            unit="x",
            samples=vs_sdk,
            target=0.8,
            details=details,
        ),
        Row(
            id="P1-sd15",
            scenario=f"client CPU per request, SD 1.5 512x512 ({common})",
            baseline="raw httpx, one persistent connection",
            figure="product CPU / raw httpx CPU",
            unit="x",
            samples=sd_vs_httpx,
            target=1.15,
            details={
                "cpu_ms_per_request_product": ms(sd["product"]),
                "cpu_ms_per_request_httpx": ms(sd["httpx"]),
            },
        ),
    ]
