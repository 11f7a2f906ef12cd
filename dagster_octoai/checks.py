"""Asset checks for generated images: none removed for safety, sizes as requested, all decode.

Two ways to get them:

- built into :func:`~dagster_octoai.octoai_image_asset` (``checks=True``, the default):
  evaluated on the images in memory as each materialization happens;
- :func:`octoai_image_checks` for any asset whose value is images (your own
  ``@asset``, or one stored by an image IO manager): loads the stored value and checks it.

Either way the images are read with :func:`~dagster_octoai.api.batch.images_of`, and each
image's expected size comes from the request it carries.
"""

# No `from __future__ import annotations`: Dagster reads the compute functions'
# annotations (the context type) at definition time.

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    multi_asset_check,
)

from .api.batch import images_of
from .api.errors import OctoAIError
from .api.images import whole_image_size
from .api.models import GeneratedImage

# dagster does not export its own alias of this.
CoercibleToAssetKey = AssetKey | str | Sequence[str]

__all__ = [
    "CHECK_DECODES",
    "CHECK_NO_REMOVED",
    "CHECK_SIZE",
    "ImageCheckTally",
    "evaluate_image_checks",
    "image_check_specs",
    "octoai_image_checks",
]

CHECK_NO_REMOVED = "no_images_removed_for_safety"
CHECK_SIZE = "image_sizes_as_requested"
CHECK_DECODES = "images_decode"

_DESCRIPTIONS = {
    CHECK_NO_REMOVED: "No image of the materialization was removed for safety.",
    CHECK_SIZE: "Every image has the width and height its request asked for.",
    CHECK_DECODES: "Every image's bytes are a whole image (readable header, end marker).",
}
# Problems listed in a failing check's metadata, at most.
_LIST_MAX = 20


@dataclass(frozen=True)
class _Image:
    seed: int
    data: bytes | None  # None: removed for safety
    expected_size: tuple[int, int]
    where: str


def image_check_specs(
    asset_key: CoercibleToAssetKey, *, blocking: bool = False
) -> list[AssetCheckSpec]:
    """The three checks' specs for ``asset_key`` (e.g. for ``@asset(check_specs=...)``).

    Examples:
        >>> [s.name for s in image_check_specs("foxes")]
        ['no_images_removed_for_safety', 'image_sizes_as_requested', 'images_decode']
    """
    key = AssetKey.from_coercible(asset_key)
    return [
        AssetCheckSpec(name, asset=key, description=text, blocking=blocking)
        for name, text in _DESCRIPTIONS.items()
    ]


def _collect(value: Any) -> Iterator[_Image]:
    for position, im in enumerate(images_of(value)):
        if im.request is None:
            raise TypeError(
                f"image {position} (seed {im.seed}) carries no request, so its expected size "
                "is unknown; check answers that carry theirs (what generate() returns)"
            )
        yield _Image(
            im.seed, im.data if im.available else None, im.request.size, _where(im, position)
        )


def _where(image: GeneratedImage, position: int) -> str:
    if image.uri is not None:
        return image.uri
    partition = "" if image.partition_key is None else f"partition {image.partition_key}: "
    return f"{partition}image {position}"


def evaluate_image_checks(
    asset_key: CoercibleToAssetKey,
    value: Any,
    *,
    removed_count: int | None = None,
) -> list[AssetCheckResult]:
    """Run the three checks on a batch (or stored images) and return their results.

    Args:
        asset_key: The checked asset.
        value: Some images: an answer, a list of answers, an ``ImageBatch``, the images
            an image IO manager loads, or a mapping of partition key to any of those.
        removed_count: Images removed for safety, when ``value`` cannot tell (stored
            images keep only the ones that exist).
    """
    key = AssetKey.from_coercible(asset_key)
    images = list(_collect(value))
    removed = [im for im in images if im.data is None]
    n_removed = len(removed) if removed_count is None else removed_count
    wrong_size: list[str] = []
    broken: list[str] = []
    for im in images:
        if im.data is None:
            continue
        try:
            # The header and the end marker, as the image stores check before writing:
            # decoding every image's pixels cost 3-7 ms each (benchmark P6).
            size = whole_image_size(im.data)
        except (ValueError, OctoAIError) as exc:
            broken.append(f"{im.where} (seed {im.seed}): {exc}")
            continue
        if size != im.expected_size:
            wrong_size.append(
                f"{im.where} (seed {im.seed}): {size[0]}x{size[1]}, "
                f"requested {im.expected_size[0]}x{im.expected_size[1]}"
            )
    checked = len(images) - len(removed)
    return [
        AssetCheckResult(
            asset_key=key,
            check_name=CHECK_NO_REMOVED,
            passed=n_removed == 0,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "removed_for_safety": n_removed,
                "images": len(images),
                "removed_seeds": [im.seed for im in removed][:_LIST_MAX],
            },
        ),
        AssetCheckResult(
            asset_key=key,
            check_name=CHECK_SIZE,
            passed=not wrong_size,
            metadata={"checked": checked, "wrong_size": wrong_size[:_LIST_MAX]},
        ),
        AssetCheckResult(
            asset_key=key,
            check_name=CHECK_DECODES,
            passed=not broken,
            metadata={"checked": checked, "not_decoding": broken[:_LIST_MAX]},
        ),
    ]


class ImageCheckTally:
    """The built-in checks over a stream of answers, one at a time, in bounded memory.

    What a streamed batch reports once it is stored: each answer is checked as it passes
    (:meth:`add`), the results merged per check (:meth:`results`).

    Examples:
        >>> list(ImageCheckTally("fox").results())
        []
    """

    def __init__(self, asset_key: CoercibleToAssetKey) -> None:
        self._key = AssetKey.from_coercible(asset_key)
        self._passed: dict[str, bool] = {}
        self._severity: dict[str, AssetCheckSeverity] = {}
        self._metadata: dict[str, dict[str, Any]] = {}

    def add(self, value: Any) -> None:
        """Check the images of ``value`` (an answer, a batch...) and merge the results."""
        for check in evaluate_image_checks(self._key, value):
            name = str(check.check_name)
            self._passed[name] = self._passed.get(name, True) and check.passed
            self._severity[name] = check.severity
            merged = self._metadata.setdefault(name, {})
            for key, item in check.metadata.items():
                raw = getattr(item, "value", item)
                if isinstance(raw, list):
                    merged[key] = (merged.get(key, []) + raw)[:_LIST_MAX]
                elif isinstance(raw, int):
                    merged[key] = merged.get(key, 0) + raw

    def results(self) -> Iterator[AssetCheckResult]:
        """One result per check: passed if it passed for every answer added."""
        for name, passed in self._passed.items():
            yield AssetCheckResult(
                asset_key=self._key,
                check_name=name,
                passed=passed,
                severity=self._severity[name],
                metadata=self._metadata[name],
            )


def octoai_image_checks(
    asset: CoercibleToAssetKey | AssetsDefinition,
    *,
    blocking: bool = False,
    name: str | None = None,
) -> AssetChecksDefinition:
    """The three image checks for an asset, as one check definition that loads its value.

    The asset's value is loaded through its IO manager (answers or an ``ImageBatch``, or
    the lists of stored :class:`~dagster_octoai.GeneratedImage` the image IO managers
    load). For the safety count of stored images, the latest materialization's
    ``removed_for_safety`` metadata is used.

    Examples:
        >>> checks = octoai_image_checks("foxes")
        >>> sorted(k.name for k in checks.check_keys)
        ['image_sizes_as_requested', 'images_decode', 'no_images_removed_for_safety']
    """
    key = asset.key if isinstance(asset, AssetsDefinition) else AssetKey.from_coercible(asset)
    specs = image_check_specs(key, blocking=blocking)

    @multi_asset_check(
        name=name or f"{key.to_python_identifier()}_octoai_image_checks",
        specs=specs,
        ins={"images": AssetIn(key=key)},
        description="OctoAI image checks: safety, sizes, decoding.",
    )
    def _checks(context: AssetCheckExecutionContext, images: Any) -> Iterator[AssetCheckResult]:
        removed = _removed_from_metadata(context, key) if _is_stored(images) else None
        yield from evaluate_image_checks(key, images, removed_count=removed)

    return _checks


def _is_stored(value: Any) -> bool:
    if isinstance(value, GeneratedImage):
        return value.uri is not None
    if isinstance(value, Mapping):
        return any(_is_stored(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_is_stored(v) for v in value)
    return False


def _removed_from_metadata(context: AssetCheckExecutionContext, key: AssetKey) -> int | None:
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("removed_for_safety")
    raw = getattr(value, "value", None)
    return raw if isinstance(raw, int) else None
