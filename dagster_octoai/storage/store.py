"""Persisting answers (some images) with a commit protocol: objects, then one manifest.

A write, as table formats (Iceberg, Delta) commit one:

1. Read the output's committed manifest and its version (the commit point).
2. Write every image once, under a key no other write uses:
   ``{output}/_objects/{write id}/{index:03d}-seed{seed}.{ext}``. Nothing committed is
   touched: an image the committed manifest already holds with the same bytes is copied
   server-side into the new write's keys, never written over a live key.
3. Commit: write the manifest with a conditional PUT, ``If-Match`` on the version read
   in step 1 (``If-None-Match: *`` when there was none); on a local directory the same
   compare-and-rename under a lock. The manifest lists only its own write's objects.
4. Retire: delete the objects of the manifest(s) the commit replaced. They are listed by
   no committed manifest any more, and only now are they deleted.

A write that fails or is killed at any step leaves the committed manifest and every
object it lists as they were; what it wrote is under its own write id, deleted by the
writer when it can and found by :meth:`ImageStore.clean_up` when it cannot. A writer
that loses the race at step 3 re-reads the new manifest: if it holds the same images it
adopts it (deleting its own), otherwise its own version replaces it (an output is
replaced whole, so the last commit wins, and it is never torn).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

from PIL import Image
from pydantic import ValidationError

from ..api.batch import UnstorableValueError
from ..api.errors import ConflictError, ImageDecodeError
from ..api.images import content_type_for, sniff_format, thumbnail_data_uri, whole_image_size
from ..api.models import (
    CallInfo,
    GeneratedImage,
    ImageGenerationRequest,
    ImageGenerationResponse,
)
from .backends import ObjectInfo, ObjectNotFoundError, StorageBackend, StorageError
from .layout import (
    MANIFEST_NAME,
    OBJECTS_DIR,
    PREFLIGHT_DIR,
    STAGING_DIR,
    WIDEST_PARTITION,
    image_name,
    index_key,
    legacy_output_key,
    longest_key,
    new_write_id,
    normalize_prefix,
    object_key,
    output_key,
    partition_dimensions,
    write_id_of,
)
from .manifest import (
    MANIFEST_SCHEMA_VERSION,
    ImageRecord,
    Manifest,
    ResultRecord,
    owner_label,
    parse_manifest,
)

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "CleanupReport",
    "ConvertFormat",
    "ImageStore",
    "WriteReport",
]

logger = logging.getLogger("dagster_octoai.storage")

ConvertFormat = Literal["png", "jpeg", "webp"]
_METADATA_VALUE_MAX = 256


def ascii_value(value: object) -> str:
    """An S3 user-metadata value: ASCII only, percent-encoded UTF-8 where needed, capped.

    Examples:
        >>> ascii_value("café/2024")
        'caf%C3%A9/2024'
    """
    text = quote(str(value), safe="/=|:,+@")
    if len(text) > _METADATA_VALUE_MAX:
        digest = hashlib.sha256(str(value).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        text = f"{text[:200]}...sha256:{digest}"
    return text


@dataclass(frozen=True)
class WriteReport:
    """What one write stored: for the output metadata."""

    uri: str
    manifest_uri: str
    image_uris: list[str]
    seeds: list[int]
    total_bytes: int
    removed_count: int
    reused_count: int
    thumbnail: str | None = field(default=None, repr=False)
    write_id: str | None = None

    @property
    def image_count(self) -> int:
        return len(self.image_uris)


@dataclass
class CleanupReport:
    """What :meth:`ImageStore.clean_up` found and removed (or would remove, dry run)."""

    removed_keys: list[str] = field(default_factory=list)
    removed_bytes: int = 0
    removed_writes: list[str] = field(default_factory=list)
    kept_in_progress: list[str] = field(default_factory=list)
    unreadable_manifests: list[str] = field(default_factory=list)
    dry_run: bool = False

    def summary(self) -> str:
        """One line for a log or the command line."""
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{verb} {len(self.removed_keys)} object(s), {self.removed_bytes:,} bytes, of "
            f"{len(self.removed_writes)} uncommitted write(s); kept "
            f"{len(self.kept_in_progress)} write(s) that may still commit; "
            f"{len(self.unreadable_manifests)} unreadable manifest(s) left alone"
        )


@dataclass
class _Head:
    """What an output's commit point holds: the base of a write, and its condition."""

    manifest: Manifest | None
    version: str | None
    #: A version-1 manifest of this output at its old key, retired after the next commit.
    legacy: tuple[str, Manifest, str] | None = None
    corrupt: bool = False


@dataclass
class _Pending:
    """A write in progress: where it stores, what it has put so far, what it still owes."""

    base: str
    write_id: str
    #: SHA-256 -> key of the images the output's committed manifest already lists.
    held: dict[str, str]
    #: What every index entry of this output says of where its result is stored.
    index_target: dict[str, Any]
    #: Keys this write has put, removed if it fails (emptied once it is committed).
    written: list[str] = field(default_factory=list)
    records: list[ResultRecord] = field(default_factory=list)
    #: The manifests reused results came from, by key (each read once per write).
    sources: dict[str, Manifest | None] = field(default_factory=dict)
    #: Index entries of reused results, moved only once this write is committed.
    index_later: list[tuple[ImageGenerationRequest, ResultRecord]] = field(default_factory=list)
    thumbnail: str | None = None
    #: The output-wide index of the next image.
    index: int = 0


class _Adopted(Exception):
    """The write lost the commit race to one of the same images: it adopts the winner's."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest.write_id)
        self.manifest = manifest


class _Uploader:
    """A thread pool that never has more than ``limit`` uploads (and their bytes) in flight."""

    def __init__(self, limit: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="octoai-store")
        self._slots = threading.BoundedSemaphore(limit)
        self._pending: list[Future[None]] = []

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._raise_failed()
        self._slots.acquire()
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _f: self._slots.release())
        self._pending.append(future)

    def _raise_failed(self) -> None:
        still = []
        for f in self._pending:
            if f.done():
                f.result()
            else:
                still.append(f)
        self._pending = still

    def wait(self) -> None:
        """Wait for every upload; raise the first failure."""
        pending, self._pending = self._pending, []
        first: BaseException | None = None
        for f in pending:
            exc = f.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first

    def __enter__(self) -> _Uploader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc is not None)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _convert(data: bytes, fmt: ConvertFormat) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        out = io.BytesIO()
        if fmt == "jpeg":
            im.convert("RGB").save(out, format="JPEG", quality=95)
        elif fmt == "png":
            im.save(out, format="PNG")
        else:
            im.save(out, format="WEBP", quality=95)
    return out.getvalue()


#: Fingerprint index entries in flight at once, at least.
_INDEX_WIDTH = 8


def _checked_size(data: bytes, seed: int) -> tuple[int, int]:
    """(width, height) of an image that is whole (:func:`~dagster_octoai.api.images.whole_image_size`).

    Raises:
        ImageDecodeError: the bytes are not a whole image.
    """
    try:
        return whole_image_size(data)
    except ValueError as exc:
        raise ImageDecodeError(f"image with seed {seed} {exc}; not stored") from None


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def answer_request(answer: Any, position: int) -> ImageGenerationRequest:
    """The request an answer to be stored carries; refuses anything else, naming it.

    Raises:
        UnstorableValueError: ``answer`` is not an answer, or one without its request.
    """
    if not isinstance(answer, ImageGenerationResponse):
        raise UnstorableValueError(
            f"item {position} of the output is {type(answer).__name__}, not an "
            "ImageGenerationResponse"
        )
    if answer.request is None:
        raise UnstorableValueError(
            f"answer {position} (seeds {answer.seeds}) carries no request, so its images "
            "cannot be stored with the request that made them: it was fetched by a bare "
            "response URL (client.fetch(url)) or built without request=; fetch the AsyncJob "
            "instead (client.fetch(job)), or build it with ImageGenerationResponse(..., request=...)"
        )
    return answer.request


def request_record(request: ImageGenerationRequest) -> dict[str, Any]:
    """The manifest form of a request: engine plus the full wire body."""
    return {"engine": request.engine.value, "body": request.to_wire()}


def request_from_record(record: Mapping[str, Any]) -> ImageGenerationRequest:
    """The request of a manifest record, validated as the server would (images as base64 only).

    Raises:
        StorageError: the record is not a valid request.
    """
    try:
        return ImageGenerationRequest.from_wire(record["body"], record["engine"])
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise StorageError(f"the manifest's request record is not a valid request: {exc}") from None


#: Commits a write retries on top of other writers' before giving up.
_MAX_REBASES = 8
#: The shortest age :meth:`ImageStore.clean_up` accepts for an uncommitted write.
MIN_ORPHAN_AGE = timedelta(hours=1)


class ImageStore:
    """Images of generation outputs in a backend, under one prefix, committed by manifest.

    Args:
        backend: where the bytes go (:class:`S3Backend` or :class:`LocalBackend`).
        prefix: the key prefix of everything this store writes.
        max_concurrency: uploads in flight at once (also the images held in memory).
        convert_to: re-encode images to this format; ``None`` keeps the server's bytes.
        fingerprint_index: also write ``{prefix}/_index/{fingerprint}.json`` for each
            result with explicit seeds, so :meth:`find_existing` can reuse a result that
            another output stored (one more PUT per result: about a fifth of the
            throughput of 1.5 MB images against SeaweedFS, benchmark P3).

    Examples:
        >>> from dagster_octoai.storage import ImageStore, LocalBackend
        >>> store = ImageStore(LocalBackend("/tmp/images"), prefix="gen")
        >>> store.output_key(["fox"], "2024-01-01")
        'gen/fox/partition=2024-01-01'
    """

    def __init__(
        self,
        backend: StorageBackend,
        prefix: str = "",
        *,
        max_concurrency: int = 8,
        convert_to: ConvertFormat | None = None,
        fingerprint_index: bool = False,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
        self.backend = backend
        self.prefix = normalize_prefix(prefix)
        self.max_concurrency = max_concurrency
        self.fingerprint_index = fingerprint_index
        self.convert_to = convert_to

    def __repr__(self) -> str:
        return f"ImageStore({self.backend!r}, prefix={self.prefix!r})"

    # ---- layout ------------------------------------------------------------------

    def output_key(self, asset_key: Sequence[str], partition_key: str | None) -> str:
        """The namespace of an output (no trailing slash): its manifest and ``_objects/``."""
        return output_key(self.prefix, asset_key, partition_key)

    def output_uri(self, asset_key: Sequence[str], partition_key: str | None) -> str:
        """The URI of an output's namespace, partition included, with a trailing slash."""
        return self.backend.uri(self.output_key(asset_key, partition_key) + "/")

    def manifest_key(self, asset_key: Sequence[str], partition_key: str | None) -> str:
        """The key of an output's manifest: its commit point."""
        return f"{self.output_key(asset_key, partition_key)}/{MANIFEST_NAME}"

    # ---- preflight -----------------------------------------------------------------

    def preflight(
        self,
        asset_key: Sequence[str] | None = None,
        partition_key: str | None = None,
        *,
        any_partition: bool = False,
        partition_keys: Sequence[str] | None = None,
    ) -> None:
        """Refuse now what storing an output would refuse later, before anything is paid for.

        Checks that the bucket (or directory) exists and takes these credentials for
        writing (one probe object, written and deleted, under ``{prefix}/_preflight/``),
        that the store honours conditional writes, and, given the output's
        ``asset_key`` and ``partition_key`` (or every key of ``partition_keys``, for a run
        over a range; or ``any_partition=True`` when the partition is not known yet, e.g.
        a response id), that no key a write of it would use is longer than the store
        allows and that its commit point does not hold another output's manifest.

        Raises:
            StorageError: the message names what is wrong and what to change.
        """
        self.backend.check()
        if asset_key:
            asset = list(asset_key)
            if any_partition:
                self.backend.check_key(longest_key(self.output_key(asset, WIDEST_PARTITION)))
            for partition in partition_keys if partition_keys is not None else [partition_key]:
                self.backend.check_key(longest_key(self.output_key(asset, partition)))
                if not any_partition:
                    self._head(asset, partition)
        parts = [self.prefix] if self.prefix else []
        self.backend.probe("/".join([*parts, PREFLIGHT_DIR, f"{uuid.uuid4().hex}.probe"]))

    # ---- manifests -----------------------------------------------------------------

    def _load(self, key: str) -> tuple[Manifest, str] | None:
        """The manifest at ``key`` and its version, or ``None``; raises if it does not parse."""
        got = self.backend.get_versioned(key)
        if got is None:
            return None
        return parse_manifest(got.data, self.backend.uri(key)), got.version

    def read_manifest_key(self, key: str) -> dict[str, Any] | None:
        """The manifest at ``key`` in its JSON form (any output's), or ``None``.

        Raises:
            StorageError: the object is not a valid manifest.
        """
        loaded = self._load(key)
        return None if loaded is None else loaded[0].model_dump(mode="json")

    def manifest(self, asset_key: Sequence[str], partition_key: str | None) -> Manifest | None:
        """The committed manifest of an output (checked to be that output's), or ``None``.

        A version-1 manifest, written before the commit protocol at the old key of a
        partition, is found there too (and checked the same way).

        Raises:
            StorageError: the manifest does not parse, or belongs to another output;
                the message names the object and what to do.
        """
        found = self._committed(list(asset_key), partition_key)
        return None if found is None else found[0]

    def read_manifest(
        self, asset_key: Sequence[str], partition_key: str | None
    ) -> dict[str, Any] | None:
        """The committed manifest of an output in its JSON form, or ``None``.

        Raises:
            StorageError: as :meth:`manifest`.
        """
        found = self.manifest(asset_key, partition_key)
        return None if found is None else found.model_dump(mode="json")

    def _committed(
        self, asset_key: list[str], partition_key: str | None
    ) -> tuple[Manifest, str, str] | None:
        """(manifest, version, key) of an output's committed manifest, checked, or ``None``."""
        partition = None if partition_key is None else str(partition_key)
        key = self.manifest_key(asset_key, partition_key)
        loaded = self._load(key)
        if loaded is not None:
            manifest, version = loaded
            if not manifest.belongs_to(asset_key, partition):
                raise self._foreign(key, manifest, asset_key, partition)
            return manifest, version, key
        legacy = self._legacy(asset_key, partition_key)
        return None if legacy is None else (legacy[1], legacy[2], legacy[0])

    def _legacy(
        self, asset_key: list[str], partition_key: str | None
    ) -> tuple[str, Manifest, str] | None:
        """A version-1 manifest of this output at its old key (if that key differs), or ``None``."""
        key = f"{legacy_output_key(self.prefix, asset_key, partition_key)}/{MANIFEST_NAME}"
        if key == self.manifest_key(asset_key, partition_key):
            return None
        try:
            loaded = self._load(key)
        except StorageError:
            return None  # whatever is there, it is no readable manifest of this output
        if loaded is None:
            return None
        manifest, version = loaded
        partition = None if partition_key is None else str(partition_key)
        # The old key is shared: a version-2 manifest of another output may sit there.
        if manifest.schema_version != 1 or not manifest.belongs_to(asset_key, partition):
            return None
        return key, manifest, version

    def _foreign(
        self, key: str, manifest: Manifest, asset_key: list[str], partition: str | None
    ) -> StorageError:
        asked = owner_label(asset_key, partition)
        return StorageError(
            f"{self.backend.uri(key)} is the manifest of {manifest.owner()}, not of {asked}: "
            "version 1 of the layout let the two share this key. Nothing was read or "
            f"written. Materialize {manifest.owner()} again (its manifest moves to its own "
            "key), or move that manifest away, then run this output again."
        )

    def _head(self, asset_key: list[str], partition_key: str | None) -> _Head:
        """The commit point of an output as a write finds it.

        A manifest that does not parse does not block the write (it is replaced, and a
        warning says so); one of another output does (nothing is written over it).
        """
        partition = None if partition_key is None else str(partition_key)
        key = self.manifest_key(asset_key, partition_key)
        got = self.backend.get_versioned(key)
        if got is not None:
            try:
                manifest = parse_manifest(got.data, self.backend.uri(key))
            except StorageError as exc:
                logger.warning("%s; this write replaces it", exc)
                return _Head(None, got.version, corrupt=True)
            if not manifest.belongs_to(asset_key, partition):
                raise self._foreign(key, manifest, asset_key, partition)
            return _Head(manifest, got.version)
        return _Head(None, None, legacy=self._legacy(asset_key, partition_key))

    # ---- write -----------------------------------------------------------------------

    def write(
        self,
        results: Iterable[ImageGenerationResponse],
        *,
        asset_key: Sequence[str],
        partition_key: str | None,
        run_id: str,
    ) -> WriteReport:
        """Store every image of the answers ``results`` (iterated once, lazily), then commit.

        Each answer must carry its request (the manifest records it). See the module
        docstring for the protocol: whatever fails, the committed output stays whole.

        Raises:
            StorageError: the store refused a write, or the output's key holds another
                output's manifest; the committed manifest is untouched.
            ConflictError: other writers kept committing this output, on every attempt.
            UnstorableValueError: an item is not an answer, or one without its request.
        """
        asset = list(asset_key)
        partition = None if partition_key is None else str(partition_key)
        base = self.output_key(asset, partition_key)
        manifest_key = f"{base}/{MANIFEST_NAME}"
        # Before the first answer is pulled: a lazy batch pays nothing if this refuses.
        head = self._head(asset, partition_key)
        pending = _Pending(
            base=base,
            write_id=new_write_id(),
            held=_held_images(head),
            index_target={
                "manifest_key": manifest_key,
                "manifest_uri": self.backend.uri(manifest_key),
                "asset_key": asset,
                "partition": partition,
            },
        )
        try:
            with (
                _Uploader(self.max_concurrency) as uploader,
                # Index entries are a few hundred bytes: max_concurrency (a bound on image
                # bytes in memory) need not hold them to one at a time.
                _Uploader(max(self.max_concurrency, _INDEX_WIDTH)) as index_uploader,
            ):
                for position_in_batch, result in enumerate(results):
                    self._store_result(
                        pending,
                        result,
                        position_in_batch,
                        uploader,
                        index_uploader,
                        run_id=run_id,
                        asset=asset,
                        partition=partition,
                    )
                uploader.wait()
                draft = self._manifest(
                    asset, partition_key, run_id, base, pending.write_id, pending.records, head
                )
                try:
                    manifest, superseded = self._commit(
                        manifest_key, draft, head, asset, partition_key
                    )
                except _Adopted as adopted:
                    logger.info(
                        "%s was committed with the same images while this write stored its "
                        "own; this write's copies are removed",
                        self.backend.uri(manifest_key),
                    )
                    self._discard(pending.written)
                    return self._report(base, adopted.manifest, pending.thumbnail)
                pending.written = []  # committed: the objects belong to the output now
                for later_request, record in pending.index_later:
                    self._submit_index(index_uploader, later_request, record, pending.index_target)
                index_uploader.wait()
        except BaseException:
            self._discard(pending.written)
            raise
        self._retire(base, manifest, superseded, head.legacy)
        return self._report(base, manifest, pending.thumbnail)

    def _store_result(
        self,
        pending: _Pending,
        result: ImageGenerationResponse,
        position_in_batch: int,
        uploader: _Uploader,
        index_uploader: _Uploader,
        *,
        run_id: str,
        asset: list[str],
        partition: str | None,
    ) -> None:
        """Queue the uploads of one answer's images, record the answer, queue its index entry."""
        request = answer_request(result, position_in_batch)
        fingerprint = request.fingerprint()
        source = self._reuse_source(result, fingerprint, pending.sources)
        metadata_of = partial(
            _object_metadata,
            request,
            result,
            fingerprint=fingerprint,
            run_id=run_id,
            asset_path="/".join(asset),
            partition=partition,
        )
        images = self._store_images(pending, result, source, metadata_of, uploader)
        record = _result_record(result, request, fingerprint, images)
        pending.records.append(record)
        # A fresh result's entry goes out now, while the batch is still being
        # generated, instead of after the manifest (100 entries added a tenth
        # to a 100-image run, P6). Until the manifest is committed the entry
        # points at this output's previous manifest or at nothing, and
        # find_existing checks fingerprint and SHA-256 there, so an early or
        # orphaned entry can only miss, never return the wrong images. A
        # reused result's entry already points at a valid manifest elsewhere:
        # it is moved only once this one is committed.
        if self.fingerprint_index and result.reused_from is None:
            self._submit_index(index_uploader, request, record, pending.index_target)
        elif self.fingerprint_index:
            pending.index_later.append((request, record))

    def _store_images(
        self,
        pending: _Pending,
        result: ImageGenerationResponse,
        source: ResultRecord | None,
        metadata_of: Callable[..., dict[str, str]],
        uploader: _Uploader,
    ) -> list[ImageRecord]:
        """Queue the upload of each available image of one answer; the records of all, in order."""
        images: list[ImageRecord] = []
        for position, image in enumerate(result.images):
            if not image.available:
                images.append(_removed_record(image, pending.index))
                pending.index += 1
                continue
            stored, data, key, sha = self._image_record(
                image,
                pending.index,
                pending.base,
                pending.write_id,
                partial(metadata_of, seed=image.seed, index=pending.index),
            )
            images.append(stored)
            pending.index += 1
            # Bytes already stored (by this output's committed write, or by the
            # output a reused result came from) are copied server-side into
            # this write's own key: never written over a live key, and no
            # object is ever listed by two writes.
            copy_from = pending.held.get(sha) or _source_key(source, position, sha)
            pending.written.append(key)
            uploader.submit(
                self._put_object,
                key,
                data,
                copy_from,
                stored.content_type,
                stored.metadata,
            )
            if pending.thumbnail is None:
                pending.thumbnail = thumbnail_data_uri(data)
            del data
        return images

    def _image_record(
        self,
        image: GeneratedImage,
        index: int,
        base: str,
        write_id: str,
        metadata_of: Callable[..., dict[str, str]],
    ) -> tuple[ImageRecord, bytes, str, str]:
        """One image to store: its record, bytes (re-encoded if ``convert_to``), key and SHA-256.

        The format is sniffed once: a converted image has the format it was converted to.
        """
        data = image.data
        fmt = sniff_format(data)
        converted_from = None
        if self.convert_to and fmt != self.convert_to:
            converted_from, fmt = fmt, self.convert_to
            data = _convert(data, self.convert_to)
        width, height = _checked_size(data, image.seed)
        key = object_key(base, write_id, image_name(index, image.seed, fmt))
        sha = _sha256(data)
        record = ImageRecord(
            index=index,
            seed=image.seed,
            key=key,
            uri=self.backend.uri(key),
            bytes=len(data),
            sha256=sha,
            content_type=content_type_for(fmt),
            format=fmt,
            width=width,
            height=height,
            converted_from=converted_from,
            removed_for_safety=False,
            safety_score=image.safety_score,
            metadata=metadata_of(size=(width, height)),
        )
        return record, data, key, sha

    def _put_object(
        self,
        key: str,
        data: bytes,
        copy_from: str | None,
        content_type: str,
        metadata: dict[str, str],
    ) -> None:
        if copy_from is not None:
            try:
                self.backend.copy(copy_from, key, content_type, metadata)
                return
            except ObjectNotFoundError:
                pass  # retired by a concurrent commit since it was read: the bytes are here
        self.backend.put(key, data, content_type, metadata)

    def _commit(
        self,
        manifest_key: str,
        draft: Manifest,
        head: _Head,
        asset: list[str],
        partition_key: str | None,
    ) -> tuple[Manifest, list[Manifest]]:
        """Write the manifest conditionally; on a lost race, adopt the winner or replace it.

        Returns the committed manifest and every manifest it superseded (whose objects
        are now to be retired).

        Raises:
            _Adopted: the winner holds the same images; this write's are not needed.
            ConflictError: the race was lost :data:`_MAX_REBASES` times in a row.
        """
        superseded = [head.manifest] if head.manifest is not None else []
        manifest = draft
        for _ in range(_MAX_REBASES):
            try:
                self.backend.put_if(
                    manifest_key,
                    manifest.model_dump_json(indent=2).encode(),
                    "application/json",
                    {
                        "asset-key": ascii_value("/".join(asset)),
                        "run-id": ascii_value(manifest.run_id),
                        "write-id": manifest.write_id or "",
                    },
                    head.version,
                )
                return manifest, superseded
            except ConflictError:
                head = self._head(asset, partition_key)
            except StorageError:
                # The PUT may have landed and only its answer been lost: then this write
                # is committed, and its objects must not be discarded.
                if self._committed_write(manifest_key) == manifest.write_id:
                    return manifest, superseded
                raise
            winner = head.manifest
            if winner is not None and _same_images(winner, manifest):
                raise _Adopted(winner)
            logger.warning(
                "%s was committed by write %s (run %s) while this write (%s, run %s) stored "
                "its images; this write's version replaces it (an output is replaced whole)",
                self.backend.uri(manifest_key),
                winner.write_id if winner else "?",
                winner.run_id if winner else "?",
                manifest.write_id,
                manifest.run_id,
            )
            if winner is not None:
                superseded.append(winner)
            manifest = manifest.model_copy(
                update={"supersedes": [m.write_id for m in superseded if m.write_id]}
            )
        raise ConflictError(
            f"{self.backend.uri(manifest_key)} was committed by other writes on each of "
            f"{_MAX_REBASES} attempts; this write's images were not committed and are "
            "removed. Run it again once the other runs of this output are done."
        )

    def _committed_write(self, manifest_key: str) -> str | None:
        """The write id the manifest at ``manifest_key`` commits, if it can be read now."""
        try:
            loaded = self._load(manifest_key)
        except StorageError:
            return None
        return None if loaded is None else loaded[0].write_id

    def _retire(
        self,
        base: str,
        manifest: Manifest,
        superseded: list[Manifest],
        legacy: tuple[str, Manifest, str] | None,
    ) -> None:
        """Delete what the commit of ``manifest`` retired: listed by no committed manifest now.

        Only objects a superseded manifest of this very output wrote are deleted: a
        version-2 write's own ``_objects/{write id}/``, or a version-1 manifest's images
        beside it, never anything under another output's key.
        """
        keep = set(manifest.object_keys())
        doomed: list[str] = []
        for old in superseded:
            doomed += [k for k in _own_objects(base, old) if k not in keep]
        if legacy is not None:
            key, old, version = legacy
            # Conditional: the old key may meanwhile hold another output's manifest.
            if self.backend.delete_if(key, version):
                doomed += [k for k in _own_objects(key.rsplit("/", 1)[0], old) if k not in keep]
        if not doomed:
            return
        try:
            self.backend.delete(doomed)
        except StorageError as exc:
            # The new manifest is committed and whole; left-overs only cost space, and
            # clean_up() finds them (the new manifest's `supersedes` names their write).
            logger.warning(
                "could not delete %d retired object(s) under %s: %s",
                len(doomed),
                self.backend.uri(base + "/"),
                exc,
            )

    def _discard(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            self.backend.delete(keys)
        except Exception as exc:  # the original error matters more
            logger.warning(
                "could not delete %d object(s) of an uncommitted write (clean_up() will): %s",
                len(keys),
                exc,
            )

    def _manifest(
        self,
        asset: list[str],
        partition_key: str | None,
        run_id: str,
        base: str,
        write_id: str,
        results: list[ResultRecord],
        head: _Head,
    ) -> Manifest:
        images = [im for r in results for im in r.images]
        previous = head.manifest.write_id if head.manifest is not None else None
        return Manifest(
            schema_version=MANIFEST_SCHEMA_VERSION,
            asset_key=asset,
            partition=None if partition_key is None else str(partition_key),
            partition_dimensions=partition_dimensions(partition_key),
            run_id=run_id,
            write_id=write_id,
            supersedes=[previous] if previous else [],
            created_at=_utcnow(),
            uri=self.backend.uri(base + "/"),
            image_count=sum(1 for im in images if im.key),
            removed_count=sum(1 for im in images if im.removed_for_safety),
            total_bytes=sum(im.bytes for im in images),
            results=results,
        )

    def _report(self, base: str, manifest: Manifest, thumbnail: str | None) -> WriteReport:
        stored = [im for im in manifest.images() if im.key]
        return WriteReport(
            uri=self.backend.uri(base + "/"),
            manifest_uri=self.backend.uri(f"{base}/{MANIFEST_NAME}"),
            image_uris=[im.uri or "" for im in stored],
            seeds=[im.seed for im in stored],
            total_bytes=sum(im.bytes for im in stored),
            removed_count=sum(1 for im in manifest.images() if im.removed_for_safety),
            reused_count=sum(len(r.images) for r in manifest.results if r.reused_from),
            thumbnail=thumbnail,
            write_id=manifest.write_id,
        )

    # ---- idempotent generation -------------------------------------------------------

    def _reuse_source(
        self,
        result: ImageGenerationResponse,
        fingerprint: str,
        cache: dict[str, Manifest | None],
    ) -> ResultRecord | None:
        """The manifest record a reused result came from, for server-side copies."""
        if not result.reused_from:
            return None
        key = self.backend.key_for_uri(result.reused_from)
        if key is None:
            return None
        if key not in cache:
            try:
                loaded = self._load(key)
            except StorageError:
                loaded = None
            cache[key] = None if loaded is None else loaded[0]
        manifest = cache[key]
        if manifest is None:
            return None
        return next((r for r in manifest.results if r.fingerprint == fingerprint), None)

    def _submit_index(
        self,
        uploader: _Uploader,
        request: ImageGenerationRequest,
        record: ResultRecord,
        target: dict[str, Any],
    ) -> None:
        """Queue the fingerprint index entry of one result (only explicit-seed requests)."""
        if request.explicit_seeds is None:
            return
        entry = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "fingerprint": record.fingerprint,
            **target,
            "image_keys": [im.key for im in record.images],
            "written_at": _utcnow(),
        }
        key = index_key(self.prefix, record.fingerprint)
        body = json.dumps(entry, indent=2, sort_keys=True).encode()

        def put() -> None:
            try:
                self.backend.put(key, body, "application/json", {})
            except StorageError as exc:
                # The index only saves money later; the output itself is complete.
                logger.warning(
                    "could not write the fingerprint index for %s: %s",
                    target["manifest_uri"],
                    exc,
                )

        uploader.submit(put)

    def find_existing(
        self,
        request: ImageGenerationRequest,
        asset_key: Sequence[str] | None = None,
        partition_key: str | None = None,
    ) -> ImageGenerationResponse | None:
        """An already stored answer to an identical request, or ``None``.

        Only requests whose every seed is explicit qualify (others are not
        reproducible). The output at ``asset_key``/``partition_key`` is looked at
        first, then (with ``fingerprint_index``) the fingerprint index. The answer's
        images are read back and checked against their sha256; it carries ``request``,
        and ``reused_from`` is the manifest's URI. A manifest that does not parse, or
        is another output's, is passed over with a warning: it must not keep a fresh
        write from replacing it.
        """
        if request.explicit_seeds is None:
            return None
        fingerprint = request.fingerprint()
        candidates: list[tuple[Manifest, str]] = []
        if asset_key:
            try:
                found = self._committed(list(asset_key), partition_key)
            except StorageError as exc:
                logger.warning("not reusing the stored output: %s", exc)
                found = None
            if found is not None:
                candidates.append((found[0], found[2]))
        raw = (
            self.backend.get_or_none(index_key(self.prefix, fingerprint))
            if self.fingerprint_index
            else None
        )
        if raw is not None:
            try:
                entry_key = str(json.loads(raw)["manifest_key"])
                loaded = self._load(entry_key)
                if loaded is not None:
                    candidates.append((loaded[0], entry_key))
            except (ValueError, KeyError, TypeError, StorageError):
                logger.warning("ignoring an unreadable fingerprint index entry for %s", fingerprint)
        for manifest, key in candidates:
            answer = self._load_result(manifest, key, request, fingerprint)
            if answer is not None:
                return answer
        return None

    def existing_answers(
        self, asset_key: Sequence[str], partition_key: str | None = None
    ) -> Callable[[ImageGenerationRequest], ImageGenerationResponse | None]:
        """A finder of answers to reuse from one output, its manifest read once.

        For a batch re-run: each request whose seeds are all explicit finds its answer in
        the output being replaced, as :meth:`find_existing` would, without reading the
        manifest again per request (the fingerprint index is not consulted).
        """
        try:
            found = self._committed(list(asset_key), partition_key)
        except StorageError as exc:
            logger.warning("not reusing the stored output: %s", exc)
            found = None
        if found is None:
            return lambda request: None
        manifest, _, key = found

        def find(request: ImageGenerationRequest) -> ImageGenerationResponse | None:
            if request.explicit_seeds is None:
                return None
            return self._load_result(manifest, key, request, request.fingerprint())

        return find

    def _load_result(
        self, manifest: Manifest, key: str, request: ImageGenerationRequest, fingerprint: str
    ) -> ImageGenerationResponse | None:
        for record in manifest.results:
            if record.fingerprint != fingerprint:
                continue
            images: list[GeneratedImage] = []
            for im in record.images:
                if im.removed_for_safety or not im.key:
                    images.append(
                        GeneratedImage(
                            image_b64=None,
                            seed=im.seed,
                            removed_for_safety=True,
                            safety_score=im.safety_score,
                        )
                    )
                    continue
                data = self.backend.get_or_none(im.key)
                if data is None or _sha256(data) != im.sha256:
                    return None
                images.append(
                    GeneratedImage.from_bytes(data, seed=im.seed, safety_score=im.safety_score)
                )
            return ImageGenerationResponse(
                images=images,
                prediction_time_ms=record.prediction_time_ms or 0.0,
                request=request,
                response_id=record.response_id,
                reused_from=self.backend.uri(key),
                call_info=CallInfo(attempts=0, response_id=record.response_id),
            )
        return None

    # ---- read ------------------------------------------------------------------------

    def read(self, asset_key: Sequence[str], partition_key: str | None) -> list[GeneratedImage]:
        """The stored images of an output in index order (blocked images have none).

        Each carries its ``request``, ``response_id``, ``uri``, ``index``, ``partition_key``
        and ``metadata``; the bytes are the stored ones. A read that overlaps a commit
        (the objects of the version it read are retired under it) reads the new one.

        Raises:
            ObjectNotFoundError: the output has no manifest (never materialized).
            StorageError: the manifest does not parse or is another output's, or an
                image is missing or its bytes do not match the manifest.
        """
        asset = list(asset_key)
        for _ in range(_READ_ATTEMPTS):
            found = self._committed(asset, partition_key)
            if found is None:
                where = self.backend.uri(self.manifest_key(asset, partition_key))
                part = "" if partition_key is None else f" partition {str(partition_key)!r} of"
                raise ObjectNotFoundError(
                    f"no manifest at {where}: was{part} asset {'/'.join(asset)!r} "
                    "materialized with this IO manager and prefix?"
                )
            manifest, version, key = found
            try:
                return self._read_images(manifest, self.backend.uri(key))
            except ObjectNotFoundError as missing:
                latest = self.backend.get_versioned(key)
                if latest is not None and latest.version != version:
                    continue  # a commit retired what this read was fetching: read the new one
                raise StorageError(
                    f"{missing.message.removeprefix('no object at ')} is listed in "
                    f"{self.backend.uri(key)} but missing: it was deleted outside this IO "
                    "manager; materialize the output again"
                ) from None
        raise StorageError(
            f"{self.output_uri(asset, partition_key)} was committed again on each of "
            f"{_READ_ATTEMPTS} attempts to read it; read it again later"
        )

    def _read_images(self, manifest: Manifest, manifest_uri: str) -> list[GeneratedImage]:
        work: list[tuple[ResultRecord, ImageRecord, ImageGenerationRequest]] = []
        for record in manifest.results:
            request = request_from_record(record.request.model_dump())
            work += [(record, im, request) for im in record.images if im.key]

        def fetch(item: tuple[ResultRecord, ImageRecord, ImageGenerationRequest]) -> GeneratedImage:
            record, im, request = item
            assert im.key is not None
            data = self.backend.get(im.key)
            if _sha256(data) != im.sha256:
                raise StorageError(
                    f"{im.uri} does not match the sha256 in {manifest_uri}: objects are never "
                    "written twice, so it was changed outside this IO manager; materialize "
                    "the output again"
                )
            return GeneratedImage.from_bytes(
                data,
                seed=im.seed,
                safety_score=im.safety_score,
                index=im.index,
                uri=im.uri,
                request=request,
                partition_key=manifest.partition,
                response_id=record.response_id,
                metadata={
                    **im.metadata,
                    "sha256": im.sha256,
                    "safety_score": im.safety_score,
                    "manifest_uri": manifest_uri,
                    "run_id": manifest.run_id,
                },
            )

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(fetch, work))

    # ---- clean-up --------------------------------------------------------------------

    def clean_up(
        self,
        *,
        older_than: timedelta = timedelta(hours=24),
        dry_run: bool = False,
        now: datetime | None = None,
    ) -> CleanupReport:
        """Remove what killed and failed writes left under this store's prefix.

        An object under an output's ``_objects/{write id}/`` is removed when that write
        is not the one the output's manifest commits, and either

        - the committed manifest names it in ``supersedes`` (a write it replaced, whose
          retiring was cut short), or
        - nothing was written under that write id for ``older_than`` (at least
          :data:`MIN_ORPHAN_AGE`): a write that died before committing. A write still
          storing its images keeps adding to its directory, so it is never taken for
          dead while it runs faster than one image per ``older_than``.

        Also removed, once ``older_than`` old: version 1's ``_staging/`` objects and
        preflight probes. Never removed: anything a committed manifest lists, and every
        output whose manifest does not parse (it is reported instead). The manifest is
        read again just before an output's objects are deleted, so a write that commits
        meanwhile keeps its objects.

        Examples:
            >>> from dagster_octoai.storage import ImageStore, LocalBackend
            >>> ImageStore(LocalBackend("/tmp/images"), prefix="gen").clean_up(dry_run=True).dry_run
            True
        """
        if older_than < MIN_ORPHAN_AGE:
            raise ValueError(
                f"older_than: {older_than} is too short; a write may still commit what it "
                f"stored that long ago (use at least {MIN_ORPHAN_AGE})"
            )
        cutoff = (now or datetime.now(timezone.utc)) - older_than
        report = CleanupReport(dry_run=dry_run)
        listing = list(self.backend.list(f"{self.prefix}/" if self.prefix else ""))
        writes: dict[tuple[str, str], list[ObjectInfo]] = {}
        loose: list[ObjectInfo] = []
        for info in listing:
            parts = info.key.split("/")
            if OBJECTS_DIR in parts[:-1]:
                at = len(parts) - 1 - parts[::-1].index(OBJECTS_DIR)
                if at + 2 <= len(parts) - 1:
                    base, write_id = "/".join(parts[:at]), parts[at + 1]
                    writes.setdefault((base, write_id), []).append(info)
            elif (STAGING_DIR in parts[:-1] or PREFLIGHT_DIR in parts[:-1]) and (
                info.modified < cutoff
            ):
                loose.append(info)
        for base in sorted({b for b, _ in writes}):
            self._clean_output(base, writes, cutoff, report)
        self._remove(loose, report)
        return report

    def _clean_output(
        self,
        base: str,
        writes: dict[tuple[str, str], list[ObjectInfo]],
        cutoff: datetime,
        report: CleanupReport,
    ) -> None:
        key = f"{base}/{MANIFEST_NAME}"
        try:
            loaded = self._load(key)
        except StorageError:
            report.unreadable_manifests.append(self.backend.uri(key))
            return
        committed = loaded[0] if loaded is not None else None
        retired = set(committed.supersedes) if committed is not None else set()
        doomed: dict[str, list[ObjectInfo]] = {}
        for (b, write_id), objects in writes.items():
            if b != base or (committed is not None and write_id == committed.write_id):
                continue
            if write_id in retired or max(o.modified for o in objects) < cutoff:
                doomed[write_id] = objects
            else:
                report.kept_in_progress.append(
                    self.backend.uri(f"{base}/{OBJECTS_DIR}/{write_id}/")
                )
        if not doomed:
            return
        # A write may have committed since the listing: it keeps its objects.
        again = self._load(key)
        if again is not None:
            doomed.pop(again[0].write_id or "", None)
        for write_id, objects in doomed.items():
            report.removed_writes.append(self.backend.uri(f"{base}/{OBJECTS_DIR}/{write_id}/"))
            self._remove(objects, report)

    def _remove(self, objects: list[ObjectInfo], report: CleanupReport) -> None:
        if not objects:
            return
        report.removed_keys += [o.key for o in objects]
        report.removed_bytes += sum(o.size for o in objects)
        if not report.dry_run:
            self.backend.delete([o.key for o in objects])


_READ_ATTEMPTS = 3


def _held_images(head: _Head) -> dict[str, str]:
    """SHA-256 -> key of every image the output's committed (or version-1) manifest lists."""
    manifests = [head.manifest] if head.manifest is not None else []
    if head.legacy is not None:
        manifests.append(head.legacy[1])
    return {im.sha256: im.key for m in manifests for im in m.images() if im.key and im.sha256}


def _own_objects(base: str, manifest: Manifest) -> list[str]:
    """The listed keys a manifest's own write put under ``base`` (nothing of other outputs)."""
    if manifest.write_id is None:  # version 1: its images beside the manifest
        return [k for k in manifest.object_keys() if k.rsplit("/", 1)[0] == base]
    return [k for k in manifest.object_keys() if write_id_of(base, k) == manifest.write_id]


def _same_images(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests hold the same requests with the same bytes, in order."""

    def shape(m: Manifest) -> list[tuple[str, list[str | None]]]:
        return [(r.fingerprint, [im.sha256 for im in r.images]) for r in m.results]

    return shape(a) == shape(b)


def _source_key(source: ResultRecord | None, position: int, sha: str) -> str | None:
    if source is None or position >= len(source.images):
        return None
    image = source.images[position]
    return image.key if image.sha256 == sha and image.key else None


def _removed_record(image: GeneratedImage, index: int) -> ImageRecord:
    return ImageRecord(
        index=index,
        seed=image.seed,
        key=None,
        uri=None,
        sha256=None,
        removed_for_safety=True,
        safety_score=image.safety_score,
    )


def _result_record(
    result: ImageGenerationResponse,
    request: ImageGenerationRequest,
    fingerprint: str,
    images: list[ImageRecord],
) -> ResultRecord:
    call = result.call_info
    return ResultRecord.model_validate(
        {
            "request": request_record(request),
            "fingerprint": fingerprint,
            "response_id": result.response_id,
            "reused_from": result.reused_from,
            "prediction_time_ms": result.prediction_time_ms,
            "call_info": {
                "attempts": call.attempts,
                "request_ids": list(call.request_ids),
                "elapsed_s": call.elapsed_s,
                "response_id": call.response_id,
            },
            "images": images,
        }
    )


def _object_metadata(
    request: ImageGenerationRequest,
    result: ImageGenerationResponse,
    *,
    seed: int,
    index: int,
    size: tuple[int, int],
    fingerprint: str,
    run_id: str,
    asset_path: str,
    partition: str | None,
) -> dict[str, str]:
    """The S3 user metadata of one image object (ASCII values, see :func:`ascii_value`)."""
    return {
        "seed": str(seed),
        "engine": request.engine.value,
        **({"sampler": request.sampler.value} if request.sampler else {}),
        **({"steps": str(request.steps)} if request.steps is not None else {}),
        **({"cfg-scale": repr(request.cfg_scale)} if request.cfg_scale is not None else {}),
        "width": str(size[0]),
        "height": str(size[1]),
        "request-fingerprint": fingerprint,
        "run-id": ascii_value(run_id),
        "asset-key": ascii_value(asset_path),
        **({"partition": ascii_value(partition)} if partition is not None else {}),
        "index": str(index),
        **({"response-id": ascii_value(result.response_id)} if result.response_id else {}),
    }
