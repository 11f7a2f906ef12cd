"""Some images: what a generation asset outputs and an image IO manager stores.

Imports no Dagster. Each answer (:class:`~dagster_octoai.api.models.ImageGenerationResponse`)
carries the request that produced it, so nothing has to pair them up: an asset may return
one answer, a list of answers, or an :class:`ImageBatch` (of many answers, possibly
generated while they are stored). :func:`responses_of` is the one place those shapes are
told apart, for the IO managers, the metadata and the checks alike; :func:`images_of`
flattens them (and images loaded back from storage) for those who need images only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .models import GeneratedImage, ImageGenerationResponse

__all__ = ["STORABLE", "ImageBatch", "UnstorableValueError", "images_of", "responses_of"]

#: What an image IO manager stores, as error messages name it.
STORABLE = (
    "an ImageGenerationResponse (what generate(), fetch() and wait() return), a list of "
    "them, or an ImageBatch (e.g. octoai.stream(context, requests) for a large batch)"
)


class UnstorableValueError(TypeError):
    """A value that is not some images: not an answer, a list of answers or an ImageBatch."""


class ImageBatch:
    """The answers of one or more requests, as one output.

    Built from a list, it can be read many times. Built from an iterator (``lazy``),
    answers are produced while the IO manager persists them, so a large batch is never
    held in memory whole; such a batch can be iterated once only, and only an image IO
    manager can store it (it cannot be pickled).

    ``late_metadata`` gives metadata known only once the batch has been iterated (the
    usage of a streamed batch, counted as it is generated): the image IO managers add it
    to the output's metadata after storing the batch.

    Examples:
        >>> ImageBatch([]).image_count
        0
        >>> ImageBatch(iter([]), late_metadata=lambda: {"frames": 0}).late_metadata()
        {'frames': 0}
    """

    def __init__(
        self,
        responses: Iterable[ImageGenerationResponse],
        *,
        expected_images: int | None = None,
        late_metadata: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._lazy = not isinstance(responses, list | tuple)
        self._responses: Iterable[ImageGenerationResponse] = (
            responses
            if self._lazy
            else [_answer(r, f"ImageBatch[{i}]") for i, r in enumerate(responses)]
        )
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
    def responses(self) -> list[ImageGenerationResponse]:
        """Every answer (a lazy batch is drained into memory; prefer iterating it)."""
        if self._lazy:
            self._responses = list(self)
            self._lazy = False
        assert isinstance(self._responses, list)
        return self._responses

    def __iter__(self) -> Iterator[ImageGenerationResponse]:
        if not self._lazy:
            return iter(self._responses)
        if self._consumed:
            raise RuntimeError("a lazy ImageBatch can be iterated only once")
        self._consumed = True
        return (_answer(r, f"ImageBatch item {i}") for i, r in enumerate(self._responses))

    @property
    def images(self) -> list[GeneratedImage]:
        return [im for r in self.responses for im in r.images]

    @property
    def image_count(self) -> int:
        return sum(len(r.images) for r in self.responses)

    def __getstate__(self) -> dict[str, Any]:
        if self._lazy:
            raise TypeError(
                "a lazy ImageBatch generates its images while an image IO manager "
                "(S3ImageIOManager, LocalImageIOManager) stores them, and cannot be pickled: "
                "give its output io_manager_key= of an image IO manager; nothing was generated"
            )
        return {**self.__dict__, "_late_metadata": None}

    def __repr__(self) -> str:
        if self._lazy:
            return f"ImageBatch(lazy, expected_images={self.expected_images})"
        return f"ImageBatch(responses={len(self.responses)}, images={self.image_count})"


def _answer(value: Any, where: str) -> ImageGenerationResponse:
    if not isinstance(value, ImageGenerationResponse):
        raise UnstorableValueError(
            f"{where} is {type(value).__name__}; an ImageBatch holds ImageGenerationResponse "
            "objects (what generate() returns)"
        )
    return value


def responses_of(value: Any) -> Iterable[ImageGenerationResponse]:
    """The answers in some images: an answer, a list or tuple of answers, or an ImageBatch.

    A lazy batch stays lazy (its answers are produced as the result is iterated).

    Raises:
        UnstorableValueError: ``value`` is none of those; the message says what it is.

    Examples:
        >>> responses_of(ImageBatch([]))
        ImageBatch(responses=0, images=0)
        >>> responses_of(b"...")
        Traceback (most recent call last):
        ...
        dagster_octoai.api.batch.UnstorableValueError: bytes is not some images; expected an ImageGenerationResponse ...
    """
    if isinstance(value, ImageBatch):
        return value
    if isinstance(value, ImageGenerationResponse):
        return [value]
    if isinstance(value, list | tuple) and all(
        isinstance(r, ImageGenerationResponse) for r in value
    ):
        return list(value)
    raise UnstorableValueError(f"{_describe(value)} is not some images; expected {STORABLE}")


def images_of(value: Any, partition_key: str | None = None) -> Iterator[GeneratedImage]:
    """Every image in ``value``, in order: anything :func:`responses_of` takes, an image,
    or lists and ``{partition: ...}`` mappings of those (what the image IO managers load).

    With ``partition_key`` a mapping that holds it gives that entry only.

    Raises:
        UnstorableValueError: something in ``value`` is not an image or an answer.
    """
    if isinstance(value, GeneratedImage):
        yield value
    elif isinstance(value, Mapping):
        if partition_key is not None and partition_key in value:
            yield from images_of(value[partition_key])
        else:
            for v in value.values():
                yield from images_of(v)
    elif isinstance(value, list | tuple) and not all(
        isinstance(v, ImageGenerationResponse) for v in value
    ):
        for v in value:
            yield from images_of(v)
    else:
        for response in responses_of(value):
            yield from response.images


def _describe(value: Any) -> str:
    if isinstance(value, list | tuple):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {', '.join(kinds) or 'nothing'}"
    return type(value).__name__
