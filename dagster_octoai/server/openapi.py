"""The OpenAPI 3.1 document of the local server, derived from the request model.

One request schema per engine, built from ``ImageGenerationRequest.model_json_schema()``
and narrowed by the engine's rules that JSON Schema can say (SDXL-only and ControlNet
fields, required ControlNet inputs, supported width x height pairs, seed bounds,
style presets, asset names), so that schema-driven testers such as schemathesis
generate what the server accepts and expect what it refuses.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from ..api.models import (
    CONTROLNET_FIELDS,
    IMAGE_FIELDS,
    SDXL_ONLY_FIELDS,
    STYLE_PRESETS,
    Engine,
    ImageGenerationRequest,
)
from ..version import __version__

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_ASSET_PATTERN = r"^(octoai:)?[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$"
_SEED = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
# Base64 (a data: URI prefix allowed). Whether the bytes are a whole JPEG or PNG is
# beyond JSON Schema; the server answers 422 when they are not.
_IMAGE = {
    "contentEncoding": "base64",
    "contentMediaType": "image/*",
    "minLength": 4,
    "pattern": r"^(data:[^,]*,)?([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
}
_ENGINE_PATHS = {
    "sdxl": Engine.SDXL,
    "sd": Engine.SD,
    "controlnet-sdxl": Engine.CONTROLNET_SDXL,
    "controlnet-sd15": Engine.CONTROLNET_SD15,
    "controlnet-sd": Engine.CONTROLNET_SD15,
    "ssd": Engine.SSD,
    "sd3": Engine.SD3,
    "flux-schnell": Engine.FLUX_SCHNELL,
    "flux-dev": Engine.FLUX_DEV,
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


@functools.lru_cache(maxsize=1)
def _base_request_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    schema = ImageGenerationRequest.model_json_schema(ref_template=_REF)
    defs = schema.pop("$defs", {})
    defs.pop("Engine", None)
    props = schema["properties"]
    props.pop("engine")
    schema.pop("description", None)
    schema.pop("title", None)
    # Rules the model checks in validators, said in JSON Schema.
    props["seed"] = {
        **{k: v for k, v in props["seed"].items() if k in ("default", "description", "title")},
        "anyOf": [
            _SEED,
            {"type": "array", "minItems": 1, "maxItems": 16, "items": _nullable(_SEED)},
            {"type": "null"},
        ],
    }
    props["style_preset"]["anyOf"][0]["enum"] = sorted(STYLE_PRESETS)
    for name in ("checkpoint", "vae", "controlnet"):
        props[name]["anyOf"][0]["pattern"] = _ASSET_PATTERN
    props["loras"]["anyOf"][0]["propertyNames"] = {"pattern": _ASSET_PATTERN}
    props["textual_inversions"]["anyOf"][0]["propertyNames"] = {"pattern": _ASSET_PATTERN}
    props["textual_inversions"]["anyOf"][0]["additionalProperties"] = {
        "type": "string",
        "pattern": r"\S",
    }
    props["transfer_images"]["anyOf"][0]["additionalProperties"] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", **_IMAGE},
    }
    props["transfer_images"]["anyOf"][0]["propertyNames"] = {"pattern": r"\S"}
    for name in IMAGE_FIELDS:
        props[name]["anyOf"][0].update(_IMAGE)
        props[name]["description"] = props[name].get("description", "") + " Base64 JPEG or PNG."
    props["image_encoding"]["anyOf"][0].pop("enum", None)
    # The server lower-cases the encoding; an ECMA-262 pattern (no inline flags) says so.
    props["image_encoding"]["anyOf"][0]["pattern"] = "^([jJ][pP][eE][gG]|[pP][nN][gG])$"
    return schema, defs


# The model's rules across fields (every engine), said in JSON Schema. Kept small on
# purpose: schema testers multiply the branches of every anyOf here (and refuse a "not"
# below the root), and past a few dozen combinations schemathesis generates nothing.
_CROSS_FIELD_RULES: list[dict[str, Any]] = [
    # A seed list has one entry per image. "Exactly num_images entries" would take one
    # branch per length; "more than one entry needs num_images > 1" is the affordable part.
    {
        "anyOf": [
            {"properties": {"seed": {"type": ["integer", "null"]}}},
            {
                "properties": {
                    "seed": {"type": "array", "maxItems": 1},
                    "num_images": {"enum": [1, None]},
                }
            },
            {
                "required": ["num_images"],
                "properties": {
                    "seed": {"type": "array", "minItems": 2},
                    "num_images": {"type": "integer", "minimum": 2},
                },
            },
        ]
    },
    # Left out, to stay within that budget: mask_image and outpainting need init_image.
    # A tester's random image fields are refused anyway (they are not pictures).
]


def _size_rule(engine: Engine) -> dict[str, Any]:
    """width and height: one of the engine's pairs (grouped by width), or neither."""
    heights: dict[int, list[int]] = {}
    for w, h in engine.resolutions:
        heights.setdefault(w, []).append(h)
    return {
        "anyOf": [
            {"properties": {"width": {"type": "null"}, "height": {"type": "null"}}},
            *(
                {
                    "required": ["width", "height"],
                    "properties": {"width": {"const": w}, "height": {"enum": hs}},
                }
                for w, hs in heights.items()
            ),
        ]
    }


def _request_schema(engine: Engine) -> dict[str, Any]:
    base, _ = _base_request_schema()
    schema = copy.deepcopy(base)
    props: dict[str, Any] = schema["properties"]
    for name in engine.refused_fields:
        props.pop(name)
    if not engine.is_sdxl:
        for name in SDXL_ONLY_FIELDS:
            props.pop(name, None)
    if engine.is_controlnet:
        schema["required"] = ["prompt", "controlnet", "controlnet_image"]
        for name in ("controlnet", "controlnet_image"):
            props[name] = props[name]["anyOf"][0] | {
                k: v for k, v in props[name].items() if k in ("description", "title")
            }
    else:
        for name in CONTROLNET_FIELDS:
            props.pop(name, None)
    schema["allOf"] = [*_CROSS_FIELD_RULES, _size_rule(engine)]
    schema["title"] = f"ImageGenerationRequest ({engine.value})"
    return schema


_MESSAGE = {
    "type": "object",
    "required": ["message"],
    "properties": {"message": {"type": "string"}},
}
_VALIDATION = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        }
    },
}
_GENERATION = {
    "type": "object",
    "required": ["images", "prediction_time_ms"],
    "properties": {
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["image_b64", "seed", "removed_for_safety"],
                "properties": {
                    "image_b64": {
                        "anyOf": [
                            {"type": "string", "contentEncoding": "base64"},
                            {"type": "null"},
                        ],
                        "description": "The JPEG or PNG image; null when removed for safety.",
                    },
                    "seed": {"type": "integer"},
                    "removed_for_safety": {"type": "boolean"},
                    "safety_score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                },
            },
        },
        "prediction_time_ms": {"type": "number"},
    },
}
_ACCEPTED = {
    "type": "object",
    "required": ["response_id", "poll_url"],
    "properties": {
        "response_id": {"type": "string"},
        "poll_url": {"type": "string", "format": "uri"},
    },
}
_POLL = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "response_id": {"type": "string"},
        "status": {
            "type": "string",
            "enum": ["pending", "running", "completed", "failed", "cancelled"],
        },
        "response_url": {"type": "string", "format": "uri"},
        "error": {"type": "string"},
        "queue_position": {
            "type": "integer",
            "minimum": 0,
            "description": "Jobs ahead of this one on its server (0 = next); while pending.",
        },
        "progress": {
            "type": "object",
            "description": "Denoising steps done and in all; while a diffusers job runs.",
            "properties": {"step": {"type": "integer"}, "steps": {"type": "integer"}},
        },
    },
}

_REQUEST_ID_HEADER = {
    "X-User-Request-ID": {
        "description": "The server's id of this request, for support tickets.",
        "schema": {"type": "string"},
    }
}


def _json(
    schema_name: str, description: str, extra_headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {**_REQUEST_ID_HEADER, **(extra_headers or {})},
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=schema_name)}}},
    }


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "string"},
    }
}


def _auth_responses() -> dict[str, Any]:
    return {
        "401": _json("Message", "Missing or invalid bearer token."),
        "403": _json("Message", "The token is not allowed to use this endpoint."),
    }


def _generate_operation(path_engine: str, engine: Engine) -> dict[str, Any]:
    schema_name = f"ImageGenerationRequest_{engine.value}"
    return {
        "post": {
            "operationId": f"generate_{path_engine.replace('-', '_')}",
            "summary": f"Generate images with {path_engine}"
            + (" (alias of controlnet-sd15)" if path_engine == "controlnet-sd" else ""),
            "deprecated": path_engine == "controlnet-sd",
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "X-OctoAI-Async",
                    "in": "header",
                    "required": False,
                    "description": "1 (or true) = run in the background: 201 with a "
                    "poll_url; any other value runs the request synchronously.",
                    "schema": {"type": "string"},
                },
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "The same key and body from the same token within the "
                    "result TTL get the first submission's response_id (async) or answer "
                    "(sync), unpaid; another body is a 409.",
                    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model=schema_name)}}
                },
            },
            "responses": {
                "200": _json("ImageGenerationResponse", "The generated images."),
                "201": _json(
                    "AsyncAccepted", "Accepted to run in the background (X-OctoAI-Async: 1)."
                ),
                "400": _json("Message", "The prompt violates the Acceptable Use Policy."),
                **_auth_responses(),
                "409": _json("Message", "The Idempotency-Key was used with another body."),
                "413": _json("Message", "The async request body is over the limit (10 MB)."),
                "422": _json("HTTPValidationError", "The body is not a valid request."),
                "429": _json("Message", "Rate limited.", _RETRY_AFTER),
                "500": _json("Message", "Server error; retry."),
                "503": _json("Message", "Temporarily unavailable; retry."),
            },
        }
    }


def _job_paths() -> dict[str, Any]:
    """The async job routes: poll or cancel a job, fetch its result."""
    response_id = {
        "name": "response_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    return {
        "/v1/requests/{response_id}": {
            "get": {
                "operationId": "poll_request",
                "summary": "Status of an async job",
                "security": [{"bearer": []}],
                "parameters": [response_id],
                "responses": {
                    "200": _json(
                        "PollResponse", "pending, running, completed (with response_url) or failed."
                    ),
                    **_auth_responses(),
                    "404": _json("Message", "Unknown or expired response_id."),
                },
            },
            "delete": {
                "operationId": "cancel_request",
                "summary": "Cancel an async job (pending: at once; running: at its next step)",
                "security": [{"bearer": []}],
                "parameters": [response_id],
                "responses": {
                    "200": _json("PollResponse", "The job's status after the request."),
                    **_auth_responses(),
                    "404": _json("Message", "Unknown or expired response_id."),
                },
            },
        },
        "/v1/responses/{response_id}": {
            "get": {
                "operationId": "fetch_response",
                "summary": "Result of a completed async job",
                "security": [{"bearer": []}],
                "parameters": [response_id],
                "responses": {
                    "200": _json("ImageGenerationResponse", "The generated images."),
                    **_auth_responses(),
                    "404": _json("Message", "Unknown or expired response_id."),
                    "409": _json("Message", "The job is not completed yet."),
                    "500": _json("Message", "The job failed; resubmit the request."),
                },
            }
        },
    }


def _healthcheck_path() -> dict[str, Any]:
    return {
        "/healthcheck": {
            "get": {
                "operationId": "healthcheck",
                "summary": "Health check",
                "responses": {
                    "200": {
                        "description": "The server is up.",
                        "headers": _REQUEST_ID_HEADER,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"status": {"type": "string"}},
                                }
                            }
                        },
                    }
                },
            }
        },
    }


@functools.lru_cache(maxsize=8)
def _document(base_url: str) -> dict[str, Any]:
    _, defs = _base_request_schema()
    schemas: dict[str, Any] = {
        **defs,
        "Message": _MESSAGE,
        "HTTPValidationError": _VALIDATION,
        "ImageGenerationResponse": _GENERATION,
        "AsyncAccepted": _ACCEPTED,
        "PollResponse": _POLL,
    }
    for engine in Engine:
        schemas[f"ImageGenerationRequest_{engine.value}"] = _request_schema(engine)
    paths: dict[str, Any] = {
        f"/generate/{name}": _generate_operation(name, engine)
        for name, engine in _ENGINE_PATHS.items()
    }
    paths.update(_job_paths())
    paths.update(_healthcheck_path())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "OctoAI-compatible image generation API (dagster-octoai local server)",
            "version": __version__,
            "description": "The subset of OctoAI's image API that dagster-octoai speaks.",
        },
        "servers": [{"url": base_url}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_document(base_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, with ``base_url`` as its server."""
    return copy.deepcopy(_document(base_url))
