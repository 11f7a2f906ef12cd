"""Dagster metadata for generated images: one place, reused by assets, ops and IO managers.

Everything here is derived from the request and the answer, never from the resource,
so no token can reach the event log through it. Image payloads never appear either:
``request.summary()`` replaces them with sizes and hashes, and the only pixels are a
thumbnail strip kept to a few tens of KB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from dagster import DataVersion, MetadataValue

from .api.batch import ImageBatch, responses_of
from .api.errors import OctoAIError
from .api.images import thumbnail_data_uri
from .api.models import ImageGenerationRequest, ImageGenerationResponse

__all__ = [
    "DEFAULT_IMAGE_PRICE",
    "MAX_THUMBNAIL_BYTES",
    "PREMIUM_PRICE_FACTOR",
    "DataVersionDigest",
    "Usage",
    "data_version_for",
    "generation_metadata",
    "image_cost",
    "model_assets",
    "thumbnail_markdown",
]

#: Upper bound on the markdown of inline thumbnails on one materialization.
MAX_THUMBNAIL_BYTES = 40_000
#: The service's default step count, used to count the steps of requests that leave it unset.
DEFAULT_STEPS = 30

#: Some images: an answer, a list of answers, or an :class:`ImageBatch`.
Results: TypeAlias = ImageGenerationResponse | ImageBatch | Sequence[ImageGenerationResponse]


def _results(results: Results) -> list[ImageGenerationResponse]:
    """The answers of some images (a lazy batch is drained: metadata needs them all)."""
    found = responses_of(results)
    return found.responses if isinstance(found, ImageBatch) else list(found)


def _request(response: ImageGenerationResponse) -> ImageGenerationRequest:
    if response.request is None:
        raise ValueError(
            f"an answer with seeds {response.seeds} carries no request (fetched by a bare "
            "response URL?): its metadata cannot name it; fetch the AsyncJob instead"
        )
    return response.request


def model_assets(request: ImageGenerationRequest) -> dict[str, Any]:
    """The model assets a request uses (checkpoint, VAE, LoRAs, textual inversions, ControlNet).

    Examples:
        >>> model_assets(ImageGenerationRequest(prompt="x", checkpoint="octoai:crystal"))
        {'checkpoint': 'octoai:crystal'}
    """
    names = ("checkpoint", "vae", "loras", "textual_inversions", "controlnet")
    return {n: getattr(request, n) for n in names if getattr(request, n) is not None}


class DataVersionDigest:
    """The data version of answers seen one at a time (a streamed batch, as it is stored).

    Examples:
        >>> DataVersionDigest().version() == data_version_for([])
        True
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, response: ImageGenerationResponse) -> None:
        """Count one answer: its request's fingerprint and the seeds it got back."""
        self._digest.update(_request(response).fingerprint().encode())
        self._digest.update(json.dumps(response.seeds).encode())

    def version(self) -> DataVersion:
        return DataVersion(self._digest.hexdigest())


def data_version_for(results: Results) -> DataVersion:
    """A data version from each request's fingerprint and the seeds it got back.

    Same request, same seeds: same images, same version. With random seeds the
    returned seeds differ from run to run, and so does the version. The image IO
    managers record the same version for every output they store.

    Examples:
        >>> data_version_for([]).value[:8]
        'e3b0c442'
    """
    digest = DataVersionDigest()
    for r in _results(results):
        digest.add(r)
    return digest.version()


def thumbnail_markdown(
    results: Results, *, max_images: int = 4, max_bytes: int = MAX_THUMBNAIL_BYTES
) -> str:
    """Markdown with small inline JPEG thumbnails, captioned with each image's seed.

    Removed or undecodable images are listed by seed instead; the total stays under
    ``max_bytes`` so the event log is never bloated.
    """
    parts: list[str] = []
    size = 0
    shown = 0
    total = 0
    for r in _results(results):
        for im in r.images:
            total += 1
            if shown >= max_images:
                continue
            if not im.available:
                parts.append(f"seed {im.seed}: removed for safety")
                continue
            try:
                uri = thumbnail_data_uri(im.data)
            except (OctoAIError, OSError, ValueError):
                parts.append(f"seed {im.seed}: does not decode")
                continue
            item = f"![seed {im.seed}]({uri}) seed {im.seed}"
            if size + len(item) > max_bytes:
                break
            parts.append(item)
            size += len(item)
            shown += 1
    if total > shown:
        parts.append(f"({shown} of {total} images shown)")
    return "\n\n".join(parts)


def generation_metadata(results: Results, *, thumbnail: bool = True) -> dict[str, MetadataValue]:
    """Materialization metadata for a batch: seeds, request, engine, model assets, counts.

    With one request the full ``request.summary()`` is shown; with several, each
    summary is listed under ``requests``. Numbers are numeric values so the UI plots them.
    The image IO managers record the facts they share with this (``images``, ``seeds``,
    ``removed_for_safety``, ``engine``, ``prediction_time_ms``, ``reused``,
    ``thumbnail``) under the same keys, so no fact is said twice under two names.
    """
    rs = _results(results)
    requests = [_request(r) for r in rs]
    images = [im for r in rs for im in r.images]
    removed = sum(1 for im in images if not im.available)
    engines = sorted({q.engine.value for q in requests})
    out: dict[str, MetadataValue] = {
        "images": MetadataValue.int(len(images)),
        "removed_for_safety": MetadataValue.int(removed),
        "seeds": MetadataValue.json([im.seed for im in images]),
        "engine": MetadataValue.text(", ".join(engines)),
        "prediction_time_ms": MetadataValue.float(float(sum(r.prediction_time_ms for r in rs))),
    }
    if len(requests) == 1:
        (request,) = requests
        out["request"] = MetadataValue.json(request.summary())
        out["request_fingerprint"] = MetadataValue.text(request.fingerprint())
        out["model_assets"] = MetadataValue.json(model_assets(request))
        size = request.size
        out["size"] = MetadataValue.text(f"{size[0]}x{size[1]}")
    elif requests:
        out["requests"] = MetadataValue.json([q.summary() for q in requests])
        merged: dict[str, Any] = {}
        for q in requests:
            for key, value in model_assets(q).items():
                merged.setdefault(key, [])
                if value not in merged[key]:
                    merged[key].append(value)
        out["model_assets"] = MetadataValue.json(merged)
    response_ids = [r.response_id for r in rs if r.response_id]
    if response_ids:
        out["response_ids"] = MetadataValue.json(response_ids)
    reused = [r.reused_from for r in rs if r.reused_from]
    # Images that came from storage instead of being paid for again (as the IO managers count).
    out["reused"] = MetadataValue.int(sum(len(r.images) for r in rs if r.reused_from))
    if reused:
        out["reused_from"] = MetadataValue.json(reused)
    if thumbnail and images:
        out["thumbnail"] = MetadataValue.md(thumbnail_markdown(rs))
    return out


#: What an image costs when the price table does not name its engine: one "standard
#: image", so ``octoai/cost`` counts standard images (a premium sampler's image counts 2).
DEFAULT_IMAGE_PRICE = 1.0
#: Premium samplers cost twice a regular one (OctoAI's image API, "2x price").
PREMIUM_PRICE_FACTOR = 2.0


def image_cost(
    engine: str, images: int, premium_images: int, prices: Mapping[str, float] | None = None
) -> float:
    """What ``images`` of ``engine`` cost, ``premium_images`` of them at twice the price.

    Examples:
        >>> image_cost("sdxl", images=3, premium_images=1, prices={"sdxl": 0.01})
        0.04
        >>> image_cost("sd", images=2, premium_images=0)  # no price: standard images
        2.0
    """
    price = (prices or {}).get(engine, DEFAULT_IMAGE_PRICE)
    regular = images - premium_images
    return round(price * (regular + PREMIUM_PRICE_FACTOR * premium_images), 12)


@dataclass
class Usage:
    """What the calls of one output used and cost: counted by the resource's session.

    ``steps`` is the diffusion steps summed over images (the service's default of
    30 for requests that leave it unset). Images are counted per engine, premium-sampler
    ones apart, which is what the cost is computed from (:func:`image_cost`).
    """

    calls: int = 0
    images: int = 0
    steps: int = 0
    premium_images: int = 0
    retries: int = 0
    images_by_engine: dict[str, int] = field(default_factory=dict)
    premium_by_engine: dict[str, int] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)

    def add(self, response: ImageGenerationResponse) -> None:
        """Count one answered call (its steps and price from the request it carries)."""
        request = response.request
        n = len(response.images)
        self.calls += 1
        self.images += n
        default = request.engine.default_steps if request else DEFAULT_STEPS
        self.steps += n * ((request.steps if request else None) or default)
        premium = n if request is not None and request.is_premium else 0
        self.premium_images += premium
        self.retries += response.call_info.retries
        engine = request.engine.value if request is not None else "unknown"
        self.images_by_engine[engine] = self.images_by_engine.get(engine, 0) + n
        self.premium_by_engine[engine] = self.premium_by_engine.get(engine, 0) + premium
        self.request_ids.extend(response.call_info.request_ids)

    def merge(self, other: Usage) -> None:
        """Add another usage record's counts to this one."""
        self.calls += other.calls
        self.images += other.images
        self.steps += other.steps
        self.premium_images += other.premium_images
        self.retries += other.retries
        for engine, n in other.images_by_engine.items():
            self.images_by_engine[engine] = self.images_by_engine.get(engine, 0) + n
        for engine, n in other.premium_by_engine.items():
            self.premium_by_engine[engine] = self.premium_by_engine.get(engine, 0) + n
        self.request_ids.extend(other.request_ids)

    def cost(self, prices: Mapping[str, float] | None = None) -> dict[str, float]:
        """The cost per engine at ``prices`` (engine -> price of one image)."""
        return {
            engine: image_cost(engine, n, self.premium_by_engine.get(engine, 0), prices)
            for engine, n in sorted(self.images_by_engine.items())
        }

    def to_metadata(
        self, prefix: str = "octoai/", *, prices: Mapping[str, float] | None = None
    ) -> dict[str, MetadataValue]:
        """Numeric metadata (so the UI plots it) under ``prefix``, one key per fact.

        What the step generated and paid for (``generated_images``: 0 when a stored result
        was reused), its cost at ``prices`` in total and per engine, steps, retries and the
        request ids. What the output holds (``images``, ``seeds``, ``removed_for_safety``,
        ``engine``...) is the output's own metadata, not repeated here.
        """
        costs = self.cost(prices)
        out: dict[str, MetadataValue] = {
            f"{prefix}calls": MetadataValue.int(self.calls),
            f"{prefix}generated_images": MetadataValue.int(self.images),
            f"{prefix}steps": MetadataValue.int(self.steps),
            f"{prefix}premium_images": MetadataValue.int(self.premium_images),
            f"{prefix}cost": MetadataValue.float(float(round(sum(costs.values()), 12))),
            f"{prefix}retries": MetadataValue.int(self.retries),
            f"{prefix}request_ids": MetadataValue.json(list(self.request_ids)),
        }
        for engine, n in sorted(self.images_by_engine.items()):
            out[f"{prefix}generated_images/{engine}"] = MetadataValue.int(n)
            out[f"{prefix}cost/{engine}"] = MetadataValue.float(costs[engine])
        return out
