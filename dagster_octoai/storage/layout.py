"""The key layout of stored images: one place that turns names into safe keys.

``{prefix}/{asset key path}/{partition}/{index:03d}-seed{seed}.{ext}`` with
``manifest.json`` beside the images. Every segment that comes from outside (asset
key parts, partition keys, multi-partition dimensions) goes through
:func:`safe_segment`, so no key can climb out of the prefix or collide with another.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

__all__ = [
    "INDEX_DIR",
    "MANIFEST_NAME",
    "PREFLIGHT_DIR",
    "image_name",
    "index_key",
    "longest_key",
    "normalize_prefix",
    "output_key",
    "partition_dimensions",
    "partition_segments",
    "safe_segment",
]

MANIFEST_NAME = "manifest.json"
INDEX_DIR = "_index"
STAGING_DIR = "_staging"
PREFLIGHT_DIR = "_preflight"
_RESERVED = frozenset({INDEX_DIR, STAGING_DIR, PREFLIGHT_DIR, MANIFEST_NAME})

# Kept as they are: what Dagster names and date partitions look like. No leading dot
# (no ".", "..", hidden files), no "~" (the escape marker), no "=" (the dimension mark).
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
_SLUG_MAX = 48
_HASH_LEN = 16

_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif"}


def safe_segment(value: str) -> str:
    """One key segment for a value, unchanged when it is already safe.

    A value with anything else (``/``, ``\\``, ``..``, control characters, a leading
    dot, non-ASCII, a reserved name, more than 100 characters) becomes a slug plus
    ``~`` and a hash of the original: ``~`` never appears in a kept value, so an
    escaped value never equals a kept one, and distinct values stay distinct.

    Examples:
        >>> safe_segment("2024-01-01")
        '2024-01-01'
        >>> safe_segment("../../etc")
        'etc~74ccf3c5b4c19a81'
    """
    if _SAFE.match(value) and value not in _RESERVED:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]
    slug = _UNSAFE_RUN.sub("_", value).strip("._-")[:_SLUG_MAX].strip("._-")
    return f"{slug or 'x'}~{digest}"


def normalize_prefix(prefix: str) -> str:
    """The prefix without leading/trailing slashes, checked segment by segment.

    Raises:
        ValueError: a segment is empty, ``.`` or ``..``, or has a backslash or control character.
    """
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    for segment in stripped.split("/"):
        if segment in ("", ".", "..") or "\\" in segment or any(ord(c) < 32 for c in segment):
            raise ValueError(
                f"prefix: {prefix!r} has an unsafe segment {segment!r}; use '/'-separated "
                "names without empty, '.' or '..' segments, backslashes or control characters"
            )
    return stripped


def partition_dimensions(partition_key: str | None) -> dict[str, str] | None:
    """The dimension -> key mapping of a Dagster ``MultiPartitionKey``, else ``None``.

    Duck-typed so this module needs no Dagster.
    """
    dims = getattr(partition_key, "keys_by_dimension", None)
    if isinstance(dims, Mapping):
        return {str(k): str(v) for k, v in dims.items()}
    return None


def partition_segments(partition_key: str | None) -> list[str]:
    """The key segments of a partition: none, ``[key]``, or ``dim=value`` sorted by dimension."""
    if partition_key is None:
        return []
    dims = partition_dimensions(partition_key)
    if dims is not None:
        return [f"{safe_segment(d)}={safe_segment(dims[d])}" for d in sorted(dims)]
    return [safe_segment(str(partition_key))]


def output_key(prefix: str, asset_key: Sequence[str], partition_key: str | None) -> str:
    """The key prefix (no trailing slash) of one output: prefix, asset key path, partition."""
    if not asset_key:
        raise ValueError("asset_key: an output needs a non-empty asset key path")
    parts = [normalize_prefix(prefix)] if prefix.strip("/") else []
    parts += [safe_segment(p) for p in asset_key]
    parts += partition_segments(partition_key)
    return "/".join(parts)


def image_name(index: int, seed: int, fmt: str | None) -> str:
    """``{index:03d}-seed{seed}.{ext}``, e.g. ``000-seed42.jpg``."""
    return f"{index:03d}-seed{int(seed)}.{_EXTENSIONS.get(fmt or '', 'bin')}"


#: The widest segment a partition key can become (a kept key is at most 100 characters).
WIDEST_PARTITION = "p" * 100
# The longest image name: a 7-digit index, the largest seed, the longest extension.
_LONGEST_NAME = image_name(9_999_999, 2**32 - 1, "webp")


def longest_key(base: str) -> str:
    """The longest key a write of the output at ``base`` may use (for preflight checks).

    Examples:
        >>> longest_key("gen/fox")
        'gen/fox/_staging/00000000000000000000000000000000/9999999-seed4294967295.webp'
    """
    return f"{base}/{STAGING_DIR}/{'0' * 32}/{_LONGEST_NAME}"


def index_key(prefix: str, fingerprint: str) -> str:
    """The key of the fingerprint index object of a request."""
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise ValueError(f"fingerprint: expected 64 hex digits, got {fingerprint!r}")
    parts = [normalize_prefix(prefix)] if prefix.strip("/") else []
    return "/".join([*parts, INDEX_DIR, f"{fingerprint}.json"])
