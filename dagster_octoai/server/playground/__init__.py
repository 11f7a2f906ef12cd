"""The web playground: a page where a person tries prompts and settings (``/playground``).

As OctoAI's demo endpoints had: pick the engine, type a prompt and a negative prompt,
set size, steps, sampler, cfg scale, seed and style preset, generate, and see the images
with their seeds. The page is static HTML, CSS and JavaScript shipped in the package (no
build step); it calls the same ``POST /generate/{engine}`` as any client, with the token
the person types in (kept in the page's memory only: never in a URL, a cookie or storage),
and shows the server's 422 messages under the fields they name. ``options.json`` gives it
the engines' sizes, samplers and style presets from the request model itself.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ...api.models import STYLE_PRESETS, Engine, Sampler

__all__ = ["playground_options", "playground_routes"]

_FILES = Path(__file__).parent
_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}
# Only this page's own script and style; images come back as data: URIs; no framing.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
# The page has no ControlNet image input: the engines it offers are these, of those served.
_PAGE_ENGINES = (
    Engine.SDXL,
    Engine.SD,
    Engine.SSD,
    Engine.SD3,
    Engine.FLUX_SCHNELL,
    Engine.FLUX_DEV,
)
_LABELS = {
    Engine.SDXL: "SDXL",
    Engine.SD: "Stable Diffusion 1.5",
    Engine.SSD: "SSD-1B",
    Engine.SD3: "Stable Diffusion 3",
    Engine.FLUX_SCHNELL: "FLUX.1 [schnell]",
    Engine.FLUX_DEV: "FLUX.1 [dev]",
}
# The page's fields that some engines refuse (the page disables them there).
_PAGE_FIELDS = ("negative_prompt", "sampler", "style_preset")


@functools.cache
def _file(name: str) -> bytes:
    return (_FILES / name).read_bytes()


def playground_options(served: Sequence[Engine] | None = None) -> dict[str, object]:
    """What the page offers, from the request model: engines, sizes, samplers, presets.

    ``served``: the engines the server's backend serves (default: every engine); the page
    offers exactly those it can drive.

    Examples:
        >>> options = playground_options()
        >>> options["engines"][0]["name"], options["engines"][0]["default_size"]
        ('sdxl', [1024, 1024])
    """
    return {
        "engines": [
            {
                "name": engine.value,
                "label": _LABELS[engine],
                "sizes": [list(size) for size in engine.resolutions],
                "default_size": list(engine.default_size),
                "default_steps": engine.default_steps,
                "style_presets": sorted(STYLE_PRESETS, key=str.lower) if engine.is_sdxl else [],
                "refused": [f for f in _PAGE_FIELDS if f in engine.refused_fields],
            }
            for engine in _PAGE_ENGINES
            if served is None or engine in served
        ],
        "samplers": [s.value for s in Sampler],
        "defaults": {"steps": 30, "cfg_scale": 12, "sampler": "DDIM", "num_images": 1},
    }


def _headers(content_type: str) -> dict[str, str]:
    return {
        "content-type": content_type,
        "content-security-policy": _CSP,
        # A new release ships new files: let a browser keep them briefly only.
        "cache-control": "no-cache",
    }


async def _page(request: Request) -> Response:
    return Response(_file("index.html"), headers=_headers(_TYPES["index.html"]))


def _assets(served: Sequence[Engine] | None) -> Callable[[Request], Awaitable[Response]]:
    options = json.dumps(playground_options(served)).encode()

    async def asset(request: Request) -> Response:
        name = request.path_params["file"]
        if name == "options.json":
            return Response(options, headers=_headers("application/json"))
        if name not in _TYPES or name == "index.html":
            return Response(b'{"message": "Not Found"}', 404, media_type="application/json")
        return Response(_file(name), headers=_headers(_TYPES[name]))

    return asset


async def _root(request: Request) -> Response:
    # Below a route prefix (Ray Serve), the page is there too.
    return RedirectResponse(f"{request.scope.get('root_path', '')}/playground", status_code=307)


def playground_routes(served: Sequence[Engine] | None = None) -> list[Route]:
    """``/`` (a redirect), ``/playground`` and its files; ``served``: the backend's engines."""
    return [
        Route("/", _root, methods=["GET"]),
        Route("/playground", _page, methods=["GET"]),
        Route("/playground/{file}", _assets(served), methods=["GET"]),
    ]
