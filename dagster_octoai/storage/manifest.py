"""The image manifest: the one commit point of an output, as a typed, versioned model.

A manifest lists every image of one output (asset key and partition) with the request
that made it, and names the write that committed it (``write_id``): every object it
lists was written by that write, under ``{output}/_objects/{write_id}/``, and is listed
by no other manifest. That is what makes clean-up safe: an object of a write that is not
the committed one is an orphan (or about to become one), never another output's image.

Schema versions:

- **2** (this version): ``write_id``, ``supersedes`` (the writes whose manifests this one
  replaced) and the object layout under ``_objects/``.
- **1** (before the commit protocol): the same fields without those two; its images sit
  beside the manifest. A version-1 manifest is read as it is (its ``write_id`` is
  ``None``) wherever it is found, once its asset key and partition are checked; the
  output's next write commits a version-2 manifest and then retires the version-1
  manifest and its images.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api.errors import StorageError

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "CallRecord",
    "ImageRecord",
    "Manifest",
    "RequestRecord",
    "ResultRecord",
    "owner_label",
    "parse_manifest",
]

MANIFEST_SCHEMA_VERSION: Literal[2] = 2


class _Record(BaseModel):
    # Unknown fields are kept (a newer writer's additions survive a read and a dump) and
    # every field this version needs is required: a record missing one is refused.
    model_config = ConfigDict(extra="allow", frozen=True)


class ImageRecord(_Record):
    """One image: where it is stored, what it is, and its object metadata."""

    index: int
    seed: int
    key: str | None = Field(description="The object's key; None for an image removed for safety.")
    uri: str | None
    bytes: int = 0
    sha256: str | None
    content_type: str | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    converted_from: str | None = None
    removed_for_safety: bool
    safety_score: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class RequestRecord(_Record):
    """A request as sent: its engine and the full wire body (never a token)."""

    engine: str
    body: dict[str, Any]


class CallRecord(_Record):
    """What the client saw of the call that produced a result."""

    attempts: int = 0
    request_ids: list[str] = Field(default_factory=list)
    elapsed_s: float = 0.0
    response_id: str | None = None


class ResultRecord(_Record):
    """One answer: its request, fingerprint, response id and images."""

    request: RequestRecord
    fingerprint: str
    response_id: str | None = None
    reused_from: str | None = None
    prediction_time_ms: float | None = None
    call_info: CallRecord = Field(default_factory=CallRecord)
    images: list[ImageRecord]


class Manifest(_Record):
    """The committed state of one output.

    Examples:
        >>> m = Manifest(asset_key=["fox"], partition=None, run_id="r1", write_id="w1",
        ...              created_at="2024-01-01T00:00:00.000Z", uri="file:///x/", results=[])
        >>> m.schema_version, m.object_keys()
        (2, [])
    """

    schema_version: Literal[1, 2] = MANIFEST_SCHEMA_VERSION
    asset_key: list[str]
    partition: str | None
    partition_dimensions: dict[str, str] | None = None
    run_id: str
    write_id: str | None = Field(
        default=None, description="The write that committed it; None for a version-1 manifest."
    )
    supersedes: list[str] = Field(
        default_factory=list, description="Write ids of the manifests this one replaced."
    )
    created_at: str
    uri: str
    image_count: int = 0
    removed_count: int = 0
    total_bytes: int = 0
    results: list[ResultRecord]

    def images(self) -> list[ImageRecord]:
        """Every image record, in index order as written."""
        return [im for r in self.results for im in r.images]

    def object_keys(self) -> list[str]:
        """The keys of the objects this manifest lists (images removed for safety have none)."""
        return [im.key for im in self.images() if im.key]

    def belongs_to(self, asset_key: list[str], partition: str | None) -> bool:
        """Whether this is the manifest of ``asset_key`` / ``partition``."""
        return self.asset_key == asset_key and self.partition == partition

    def owner(self) -> str:
        """``asset 'a/b' partition 'p'`` (or ``asset 'a/b'``), for messages."""
        return owner_label(self.asset_key, self.partition)


def owner_label(asset_key: list[str], partition: str | None) -> str:
    """``asset 'a/b' partition 'p'`` (or ``asset 'a/b'``), for messages."""
    part = "" if partition is None else f" partition {partition!r}"
    return f"asset {'/'.join(asset_key)!r}{part}"


def parse_manifest(raw: bytes, uri: str) -> Manifest:
    """A manifest from its stored bytes, version 1 or 2.

    Raises:
        StorageError: the bytes are not a manifest of a known version; the message names
            the object and what to do.
    """
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}"
            for e in exc.errors()[:3]
        )
        raise StorageError(
            f"{uri} is not a valid image manifest (schema version 1 or 2: {problems}); "
            "re-materialize the output to replace it (its images are then stored anew), or "
            "restore the manifest from a backup"
        ) from None
