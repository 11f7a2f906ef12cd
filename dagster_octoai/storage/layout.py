"""The key layout of stored images: one place that turns names into safe keys.

Each output (asset key and partition) owns one namespace::

    {prefix}/{asset key path}                          an unpartitioned output
    {prefix}/{asset key path}/partition={key}          a partition
    {prefix}/{asset key path}/{dim}={key}/{dim}={key}  a multi-partition (dimensions sorted)

holding ``manifest.json`` (the commit point) and ``_objects/{write id}/`` (the images of
each write: ``{index:03d}-seed{seed}.{ext}``). Every segment that comes from outside
(asset key parts, partition keys, dimensions) goes through :func:`safe_segment`: a kept
segment never holds ``=`` and is never a reserved name (``_objects``, ``manifest.json``,
...), so a partition's segment can never be read as an asset key's, and no two outputs
ever share a key: asset ``products`` partition ``shoes`` is ``products/partition=shoes``,
asset ``products/shoes`` is ``products/shoes``. An output's objects all sit under its
own ``_objects/``, which no other output's key can reach.

Version 1 (before the commit protocol) put a partition's segment bare
(``products/shoes``) and the images beside the manifest; :func:`legacy_output_key` gives
that key, for reading what version 1 stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

__all__ = [
    "INDEX_DIR",
    "MANIFEST_NAME",
    "OBJECTS_DIR",
    "PREFLIGHT_DIR",
    "image_name",
    "index_key",
    "legacy_output_key",
    "longest_key",
    "new_write_id",
    "normalize_prefix",
    "object_key",
    "output_key",
    "partition_dimensions",
    "partition_segments",
    "safe_segment",
    "write_id_of",
]

MANIFEST_NAME = "manifest.json"
INDEX_DIR = "_index"
STAGING_DIR = "_staging"
PREFLIGHT_DIR = "_preflight"
OBJECTS_DIR = "_objects"
_RESERVED = frozenset({INDEX_DIR, STAGING_DIR, PREFLIGHT_DIR, OBJECTS_DIR, MANIFEST_NAME})
#: The segment of a single-dimension partition: ``partition=<key>``.
PARTITION_MARK = "partition"

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
    """The key segments of a partition: none, ``partition=<key>``, or ``dim=value`` by dimension.

    Examples:
        >>> partition_segments("2024-01-01")
        ['partition=2024-01-01']
    """
    if partition_key is None:
        return []
    dims = partition_dimensions(partition_key)
    if dims is not None:
        return [f"{safe_segment(d)}={safe_segment(dims[d])}" for d in sorted(dims)]
    return [f"{PARTITION_MARK}={safe_segment(str(partition_key))}"]


def output_key(prefix: str, asset_key: Sequence[str], partition_key: str | None) -> str:
    """The namespace (no trailing slash) of one output: prefix, asset key path, partition.

    Examples:
        >>> output_key("gen", ["products"], "shoes"), output_key("gen", ["products", "shoes"], None)
        ('gen/products/partition=shoes', 'gen/products/shoes')
    """
    return "/".join([*_asset_parts(prefix, asset_key), *partition_segments(partition_key)])


def legacy_output_key(prefix: str, asset_key: Sequence[str], partition_key: str | None) -> str:
    """Where version 1 put an output: the partition's segment bare (shared by other outputs)."""
    parts = _asset_parts(prefix, asset_key)
    dims = partition_dimensions(partition_key)
    if partition_key is None or dims is not None:
        return "/".join([*parts, *partition_segments(partition_key)])
    return "/".join([*parts, safe_segment(str(partition_key))])


def _asset_parts(prefix: str, asset_key: Sequence[str]) -> list[str]:
    if not asset_key:
        raise ValueError("asset_key: an output needs a non-empty asset key path")
    parts = [normalize_prefix(prefix)] if prefix.strip("/") else []
    return parts + [safe_segment(p) for p in asset_key]


def new_write_id() -> str:
    """A fresh write id: the UTC time it started and 10 random hex digits.

    Examples:
        >>> len(new_write_id()), new_write_id()[8]
        (27, 'T')
    """
    now = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(5)}"


def object_key(base: str, write_id: str, name: str) -> str:
    """The key of one object of a write: ``{output}/_objects/{write id}/{name}``."""
    return f"{base}/{OBJECTS_DIR}/{write_id}/{name}"


def write_id_of(base: str, key: str) -> str | None:
    """The write id of an object key of the output at ``base``, or ``None`` if it is none."""
    head = f"{base}/{OBJECTS_DIR}/"
    if not key.startswith(head):
        return None
    write_id, sep, _ = key[len(head) :].partition("/")
    return write_id if sep and write_id else None


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
        'gen/fox/_objects/20240101T000000Z-0000000000/9999999-seed4294967295.webp'
    """
    return object_key(base, "20240101T000000Z-0000000000", _LONGEST_NAME)


def index_key(prefix: str, fingerprint: str) -> str:
    """The key of the fingerprint index object of a request."""
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise ValueError(f"fingerprint: expected 64 hex digits, got {fingerprint!r}")
    parts = [normalize_prefix(prefix)] if prefix.strip("/") else []
    return "/".join([*parts, INDEX_DIR, f"{fingerprint}.json"])
