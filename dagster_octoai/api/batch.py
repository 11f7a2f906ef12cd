"""What a generation asset outputs and an image IO manager stores and loads.

Imports no Dagster: the data flows request -> client -> answer -> :class:`ImageBatch`
-> IO manager -> storage, and back as :class:`StoredImage` for downstream assets.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .errors import ImageDecodeError
from .images import content_type_for, sniff_format
from .models import GeneratedImage, ImageGenerationRequest, ImageGenerationResponse

__all__ = ["GenerationResult", "ImageBatch", "StoredImage"]


@dataclass(frozen=True)
class GenerationResult:
    """One request and the answer it got.

    ``response_id`` is the async job's id when the answer came through the async
    flow; ``reused_from`` is the manifest URI when an identical, already persisted
    result was reused instead of paying for it again.
    """

    request: ImageGenerationRequest
    response: ImageGenerationResponse
    response_id: str | None = None
    reused_from: str | None = None

    @property
    def images(self) -> list[GeneratedImage]:
        return self.response.images


class ImageBatch:
    """The output of a generation asset: the results of one or more requests.

    Built from a list, it can be read many times. Built from an iterator (``lazy``),
    results are produced while the IO manager persists them, so a large batch is
    never held in memory whole; such a batch can be iterated once only.

    ``late_metadata`` gives metadata known only once the batch has been iterated
    (the usage of a streamed batch, counted as it is generated): the image IO
    managers add it to the output's metadata after storing the batch.

    Examples:
        >>> ImageBatch([]).image_count
        0
        >>> ImageBatch(iter([]), late_metadata=lambda: {"frames": 0}).late_metadata()
        {'frames': 0}
    """

    def __init__(
        self,
        results: Iterable[GenerationResult],
        *,
        expected_images: int | None = None,
        late_metadata: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._lazy = not isinstance(results, list | tuple)
        self._results: Iterable[GenerationResult] = results if self._lazy else list(results)
        self._consumed = False
        self._late_metadata = late_metadata
        self.expected_images = expected_images

    def late_metadata(self) -> dict[str, Any]:
        """Metadata for the output that only the iterated batch can give (empty by default)."""
        return dict(self._late_metadata()) if self._late_metadata is not None else {}

    @property
    def lazy(self) -> bool:
        return self._lazy

    @property
    def results(self) -> list[GenerationResult]:
        """All results (a lazy batch is drained into memory; prefer iterating it)."""
        if self._lazy:
            self._results = list(self)
            self._lazy = False
        assert isinstance(self._results, list)
        return self._results

    def __iter__(self) -> Iterator[GenerationResult]:
        if self._lazy:
            if self._consumed:
                raise RuntimeError("a lazy ImageBatch can be iterated only once")
            self._consumed = True
        return iter(self._results)

    @property
    def images(self) -> list[GeneratedImage]:
        return [im for r in self.results for im in r.images]

    @property
    def image_count(self) -> int:
        return sum(len(r.images) for r in self.results)

    def __repr__(self) -> str:
        if self._lazy:
            return f"ImageBatch(lazy, expected_images={self.expected_images})"
        return f"ImageBatch(results={len(self.results)}, images={self.image_count})"


@dataclass(frozen=True)
class StoredImage:
    """A persisted image as a downstream asset loads it back.

    ``request`` is the full request that made it (from the manifest), so the image
    can be regenerated; ``uri`` is where it is stored.
    """

    data: bytes = field(repr=False)
    seed: int
    index: int
    uri: str
    request: ImageGenerationRequest
    partition_key: str | None = None
    response_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def format(self) -> str | None:
        return sniff_format(self.data)

    @property
    def content_type(self) -> str:
        return content_type_for(self.format)

    def to_pil(self) -> Image.Image:
        """The image as a loaded ``PIL.Image``."""
        try:
            im = Image.open(io.BytesIO(self.data))
            im.load()
        except (OSError, SyntaxError) as exc:
            raise ImageDecodeError(f"{self.uri} does not decode: {exc}") from None
        return im
