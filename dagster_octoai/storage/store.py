"""Persisting answers (some images): images, manifest, fingerprint index.

The write order keeps readers safe: images first (with the optional fingerprint index
entries of fresh results alongside), the manifest last, then the clean-up of what the
new manifest no longer lists. An
image whose key the previous manifest lists with other bytes is written to a
staging key first and moved into place only once every image is stored, so a
failure while the batch is still generating (the long part) leaves the previous
manifest and all its images as they were.
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
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

from PIL import Image
from pydantic import ValidationError

from ..api.batch import UnstorableValueError
from ..api.errors import ImageDecodeError
from ..api.images import content_type_for, sniff_format, thumbnail_data_uri, whole_image_size
from ..api.models import (
    CallInfo,
    GeneratedImage,
    ImageGenerationRequest,
    ImageGenerationResponse,
)
from .backends import ObjectNotFoundError, StorageBackend, StorageError
from .layout import (
    MANIFEST_NAME,
    PREFLIGHT_DIR,
    STAGING_DIR,
    WIDEST_PARTITION,
    image_name,
    index_key,
    longest_key,
    normalize_prefix,
    output_key,
    partition_dimensions,
)

__all__ = ["MANIFEST_SCHEMA_VERSION", "ConvertFormat", "ImageStore", "WriteReport"]

logger = logging.getLogger("dagster_octoai.storage")

MANIFEST_SCHEMA_VERSION = 1
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

    @property
    def image_count(self) -> int:
        return len(self.image_uris)


@dataclass
class _Staged:
    staging_key: str
    key: str
    content_type: str
    metadata: dict[str, str]


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


class ImageStore:
    """Images of generation outputs in a backend, under one prefix.

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
        'gen/fox/2024-01-01'
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
        """The key prefix of an output (no trailing slash)."""
        return output_key(self.prefix, asset_key, partition_key)

    def output_uri(self, asset_key: Sequence[str], partition_key: str | None) -> str:
        """The URI of an output's prefix, partition included, with a trailing slash."""
        return self.backend.uri(self.output_key(asset_key, partition_key) + "/")

    def manifest_key(self, asset_key: Sequence[str], partition_key: str | None) -> str:
        return f"{self.output_key(asset_key, partition_key)}/{MANIFEST_NAME}"

    # ---- preflight -----------------------------------------------------------------

    def preflight(
        self,
        asset_key: Sequence[str] | None = None,
        partition_key: str | None = None,
        *,
        any_partition: bool = False,
    ) -> None:
        """Refuse now what storing an output would refuse later, before anything is paid for.

        Checks that the bucket (or directory) exists and takes these credentials for
        writing (one probe object, written and deleted, under ``{prefix}/_preflight/``),
        that the store honours conditional writes, and, given the output's
        ``asset_key`` and ``partition_key`` (or ``any_partition=True`` when the
        partition is not known yet, e.g. a response id), that no key a write of it
        would use is longer than the store allows.

        Raises:
            StorageError: the message names what is wrong and what to change.
        """
        self.backend.check()
        if asset_key:
            partition = WIDEST_PARTITION if any_partition else partition_key
            self.backend.check_key(longest_key(self.output_key(asset_key, partition)))
        parts = [self.prefix] if self.prefix else []
        self.backend.probe("/".join([*parts, PREFLIGHT_DIR, f"{uuid.uuid4().hex}.probe"]))

    # ---- manifests -----------------------------------------------------------------

    def read_manifest_key(self, key: str) -> dict[str, Any] | None:
        """A manifest by key, or ``None`` when there is none."""
        raw = self.backend.get_or_none(key)
        if raw is None:
            return None
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise StorageError(f"{self.backend.uri(key)} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("schema_version") != 1:
            raise StorageError(f"{self.backend.uri(key)} is not a schema_version 1 image manifest")
        return manifest

    def read_manifest(
        self, asset_key: Sequence[str], partition_key: str | None
    ) -> dict[str, Any] | None:
        """The manifest of an output, or ``None`` when it was never written."""
        return self.read_manifest_key(self.manifest_key(asset_key, partition_key))

    # ---- write -----------------------------------------------------------------------

    def write(
        self,
        results: Iterable[ImageGenerationResponse],
        *,
        asset_key: Sequence[str],
        partition_key: str | None,
        run_id: str,
    ) -> WriteReport:
        """Store every image of the answers ``results`` (iterated once, lazily), then the manifest.

        Each answer must carry its request (the manifest records it).

        Raises:
            StorageError: the store refused a write; the previous manifest is untouched.
            UnstorableValueError: an item is not an answer, or one without its request.
        """
        base = self.output_key(asset_key, partition_key)
        manifest_key = f"{base}/{MANIFEST_NAME}"
        old = self.read_manifest_key(manifest_key)
        old_images = {
            im["key"]: im for r in (old or {}).get("results", []) for im in r["images"] if im["key"]
        }
        staging_root = f"{base}/{STAGING_DIR}/{uuid.uuid4().hex}"
        direct: list[str] = []
        staged: list[_Staged] = []
        result_records: list[dict[str, Any]] = []
        sources: dict[str, dict[str, Any] | None] = {}
        thumbnail: str | None = None
        asset_path = "/".join(asset_key)
        index = 0
        manifest_uri = self.backend.uri(manifest_key)
        # What every index entry of this output says of where its result is stored.
        index_target = {
            "manifest_key": manifest_key,
            "manifest_uri": manifest_uri,
            "asset_key": list(asset_key),
            "partition": None if partition_key is None else str(partition_key),
        }
        index_later: list[tuple[ImageGenerationRequest, dict[str, Any]]] = []
        try:
            with (
                _Uploader(self.max_concurrency) as uploader,
                # Index entries are a few hundred bytes: max_concurrency (a bound on image
                # bytes in memory) need not hold them to one at a time.
                _Uploader(max(self.max_concurrency, _INDEX_WIDTH)) as index_uploader,
            ):
                for position_in_batch, result in enumerate(results):
                    request = answer_request(result, position_in_batch)
                    fingerprint = request.fingerprint()
                    source = self._reuse_source(result, fingerprint, sources)
                    image_records: list[dict[str, Any]] = []
                    for position, image in enumerate(result.images):
                        record = self._image_record(image, index)
                        image_records.append(record)
                        index += 1
                        if not image.available:
                            continue
                        data = image.data
                        converted_from = None
                        if self.convert_to and sniff_format(data) != self.convert_to:
                            converted_from = sniff_format(data)
                            data = _convert(data, self.convert_to)
                        fmt = sniff_format(data)
                        width, height = _checked_size(data, image.seed)
                        key = f"{base}/{image_name(record['index'], image.seed, fmt)}"
                        sha = _sha256(data)
                        metadata = {
                            "seed": str(image.seed),
                            "engine": request.engine.value,
                            **({"sampler": request.sampler.value} if request.sampler else {}),
                            **({"steps": str(request.steps)} if request.steps is not None else {}),
                            **(
                                {"cfg-scale": repr(request.cfg_scale)}
                                if request.cfg_scale is not None
                                else {}
                            ),
                            "width": str(width),
                            "height": str(height),
                            "request-fingerprint": fingerprint,
                            "run-id": ascii_value(run_id),
                            "asset-key": ascii_value(asset_path),
                            **(
                                {"partition": ascii_value(partition_key)}
                                if partition_key is not None
                                else {}
                            ),
                            "index": str(record["index"]),
                            **(
                                {"response-id": ascii_value(result.response_id)}
                                if result.response_id
                                else {}
                            ),
                        }
                        content_type = content_type_for(fmt)
                        record.update(
                            key=key,
                            uri=self.backend.uri(key),
                            bytes=len(data),
                            sha256=sha,
                            content_type=content_type,
                            format=fmt,
                            width=width,
                            height=height,
                            converted_from=converted_from,
                            metadata=metadata,
                        )
                        source_key = self._source_key(source, position, sha)
                        old_image = old_images.get(key)
                        if old_image is not None and old_image.get("sha256") == sha:
                            # Same bytes already there: refresh the metadata only, no upload.
                            uploader.submit(self.backend.copy, key, key, content_type, metadata)
                        elif old_image is not None:
                            target = f"{staging_root}/{key.rsplit('/', 1)[1]}"
                            staged.append(_Staged(target, key, content_type, metadata))
                            self._submit(uploader, data, source_key, target, content_type, metadata)
                        else:
                            direct.append(key)
                            self._submit(uploader, data, source_key, key, content_type, metadata)
                        if thumbnail is None:
                            thumbnail = thumbnail_data_uri(data)
                        del data
                    record = self._result_record(result, request, fingerprint, image_records)
                    result_records.append(record)
                    # A fresh result's entry goes out now, while the batch is still being
                    # generated, instead of after the manifest (100 entries added a tenth
                    # to a 100-image run, P6). Until the manifest is written the entry
                    # points at this output's previous manifest or at nothing, and
                    # find_existing checks fingerprint and SHA-256 there, so an early or
                    # orphaned entry can only miss, never return the wrong images. A
                    # reused result's entry already points at a valid manifest elsewhere:
                    # it is moved only once this one exists.
                    if self.fingerprint_index and result.reused_from is None:
                        self._submit_index(index_uploader, request, record, index_target)
                    elif self.fingerprint_index:
                        index_later.append((request, record))
                uploader.wait()
                for item in staged:
                    uploader.submit(
                        self.backend.copy,
                        item.staging_key,
                        item.key,
                        item.content_type,
                        item.metadata,
                    )
                uploader.wait()
                manifest = self._manifest(asset_key, partition_key, run_id, base, result_records)
                self.backend.put(
                    manifest_key,
                    json.dumps(manifest, indent=2, sort_keys=True).encode(),
                    "application/json",
                    {"asset-key": ascii_value(asset_path), "run-id": ascii_value(run_id)},
                )
                for later_request, record in index_later:
                    self._submit_index(index_uploader, later_request, record, index_target)
                index_uploader.wait()
        except BaseException:
            self._discard([*direct, *(s.staging_key for s in staged)])
            raise

        new_keys = {im["key"] for r in result_records for im in r["images"] if im["key"]}
        stale = [k for k in old_images if k not in new_keys]
        try:
            self.backend.delete([*(s.staging_key for s in staged), *stale])
        except StorageError as exc:
            # The new manifest is written and valid; left-overs only cost space.
            logger.warning("could not clean up after writing %s: %s", manifest_uri, exc)
        stored = [im for r in result_records for im in r["images"] if im["key"]]
        return WriteReport(
            uri=self.backend.uri(base + "/"),
            manifest_uri=manifest_uri,
            image_uris=[im["uri"] for im in stored],
            seeds=[im["seed"] for im in stored],
            total_bytes=sum(im["bytes"] for im in stored),
            removed_count=sum(
                1 for r in result_records for im in r["images"] if im["removed_for_safety"]
            ),
            reused_count=sum(len(r["images"]) for r in result_records if r["reused_from"]),
            thumbnail=thumbnail,
        )

    def _submit(
        self,
        uploader: _Uploader,
        data: bytes,
        source_key: str | None,
        key: str,
        content_type: str,
        metadata: dict[str, str],
    ) -> None:
        if source_key is not None:
            uploader.submit(self.backend.copy, source_key, key, content_type, metadata)
        else:
            uploader.submit(self.backend.put, key, data, content_type, metadata)

    def _discard(self, keys: list[str]) -> None:
        try:
            self.backend.delete(keys)
        except Exception as exc:  # the original error matters more
            logger.warning("could not delete %d partial object(s): %s", len(keys), exc)

    @staticmethod
    def _image_record(image: GeneratedImage, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "seed": image.seed,
            "key": None,
            "uri": None,
            "bytes": 0,
            "sha256": None,
            "content_type": None,
            "format": None,
            "width": None,
            "height": None,
            "converted_from": None,
            "removed_for_safety": not image.available,
            "safety_score": image.safety_score,
            "metadata": {},
        }

    @staticmethod
    def _result_record(
        result: ImageGenerationResponse,
        request: ImageGenerationRequest,
        fingerprint: str,
        images: list[dict[str, Any]],
    ) -> dict[str, Any]:
        call = result.call_info
        return {
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

    def _manifest(
        self,
        asset_key: Sequence[str],
        partition_key: str | None,
        run_id: str,
        base: str,
        results: list[dict[str, Any]],
    ) -> dict[str, Any]:
        images = [im for r in results for im in r["images"]]
        return {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "asset_key": list(asset_key),
            "partition": None if partition_key is None else str(partition_key),
            "partition_dimensions": partition_dimensions(partition_key),
            "run_id": run_id,
            "created_at": _utcnow(),
            "uri": self.backend.uri(base + "/"),
            "image_count": sum(1 for im in images if im["key"]),
            "removed_count": sum(1 for im in images if im["removed_for_safety"]),
            "total_bytes": sum(im["bytes"] for im in images),
            "results": results,
        }

    # ---- idempotent generation -------------------------------------------------------

    def _reuse_source(
        self,
        result: ImageGenerationResponse,
        fingerprint: str,
        cache: dict[str, dict[str, Any] | None],
    ) -> dict[str, Any] | None:
        """The manifest record a reused result came from, for server-side copies."""
        if not result.reused_from:
            return None
        key = self.backend.key_for_uri(result.reused_from)
        if key is None:
            return None
        if key not in cache:
            try:
                cache[key] = self.read_manifest_key(key)
            except StorageError:
                cache[key] = None
        manifest = cache[key]
        if manifest is None:
            return None
        for record in manifest["results"]:
            if record.get("fingerprint") == fingerprint:
                return dict(record)
        return None

    @staticmethod
    def _source_key(source: dict[str, Any] | None, position: int, sha: str) -> str | None:
        if source is None or position >= len(source["images"]):
            return None
        image = source["images"][position]
        return image["key"] if image.get("sha256") == sha and image.get("key") else None

    def _submit_index(
        self,
        uploader: _Uploader,
        request: ImageGenerationRequest,
        record: dict[str, Any],
        target: dict[str, Any],
    ) -> None:
        """Queue the fingerprint index entry of one result (only explicit-seed requests)."""
        if request.explicit_seeds is None:
            return
        entry = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "fingerprint": record["fingerprint"],
            **target,
            "image_keys": [im["key"] for im in record["images"]],
            "written_at": _utcnow(),
        }
        key = index_key(self.prefix, record["fingerprint"])
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
        and ``reused_from`` is the manifest's URI.
        """
        if request.explicit_seeds is None:
            return None
        fingerprint = request.fingerprint()
        candidates: list[str] = []
        if asset_key:
            candidates.append(self.manifest_key(asset_key, partition_key))
        raw = (
            self.backend.get_or_none(index_key(self.prefix, fingerprint))
            if self.fingerprint_index
            else None
        )
        if raw is not None:
            try:
                entry = json.loads(raw)
                candidates.append(str(entry["manifest_key"]))
            except (ValueError, KeyError, TypeError):
                logger.warning("ignoring an unreadable fingerprint index entry for %s", fingerprint)
        for manifest_key in dict.fromkeys(candidates):
            found = self._load_result(manifest_key, request, fingerprint)
            if found is not None:
                return found
        return None

    def _load_result(
        self, manifest_key: str, request: ImageGenerationRequest, fingerprint: str
    ) -> ImageGenerationResponse | None:
        manifest = self.read_manifest_key(manifest_key)
        if manifest is None:
            return None
        for record in manifest["results"]:
            if record.get("fingerprint") != fingerprint:
                continue
            images: list[GeneratedImage] = []
            for im in record["images"]:
                if im["removed_for_safety"] or not im["key"]:
                    images.append(
                        GeneratedImage(
                            image_b64=None,
                            seed=im["seed"],
                            removed_for_safety=True,
                            safety_score=im["safety_score"],
                        )
                    )
                    continue
                data = self.backend.get_or_none(im["key"])
                if data is None or _sha256(data) != im["sha256"]:
                    return None
                images.append(
                    GeneratedImage.from_bytes(
                        data, seed=im["seed"], safety_score=im["safety_score"]
                    )
                )
            response_id = record.get("response_id")
            return ImageGenerationResponse(
                images=images,
                prediction_time_ms=record.get("prediction_time_ms") or 0.0,
                request=request,
                response_id=response_id,
                reused_from=self.backend.uri(manifest_key),
                call_info=CallInfo(attempts=0, response_id=response_id),
            )
        return None

    # ---- read ------------------------------------------------------------------------

    def read(self, asset_key: Sequence[str], partition_key: str | None) -> list[GeneratedImage]:
        """The stored images of an output in index order (blocked images have none).

        Each carries its ``request``, ``response_id``, ``uri``, ``index``, ``partition_key``
        and ``metadata``; the bytes are the stored ones.

        Raises:
            ObjectNotFoundError: the output has no manifest (never materialized).
            StorageError: an image is missing or its bytes do not match the manifest.
        """
        manifest_key = self.manifest_key(asset_key, partition_key)
        manifest = self.read_manifest_key(manifest_key)
        if manifest is None:
            where = self.backend.uri(manifest_key)
            part = "" if partition_key is None else f" partition {str(partition_key)!r} of"
            raise ObjectNotFoundError(
                f"no manifest at {where}: was{part} asset {'/'.join(asset_key)!r} materialized "
                "with this IO manager and prefix?"
            )
        manifest_uri = self.backend.uri(manifest_key)
        work: list[tuple[dict[str, Any], dict[str, Any], ImageGenerationRequest]] = []
        for record in manifest["results"]:
            request = request_from_record(record["request"])
            work += [(record, im, request) for im in record["images"] if im["key"]]

        def fetch(
            item: tuple[dict[str, Any], dict[str, Any], ImageGenerationRequest],
        ) -> GeneratedImage:
            record, im, request = item
            try:
                data = self.backend.get(im["key"])
            except ObjectNotFoundError:
                raise StorageError(f"{im['uri']} is listed in {manifest_uri} but missing") from None
            if _sha256(data) != im["sha256"]:
                raise StorageError(
                    f"{im['uri']} does not match the sha256 in {manifest_uri}; it was "
                    "overwritten outside this IO manager"
                )
            return GeneratedImage.from_bytes(
                data,
                seed=im["seed"],
                safety_score=im["safety_score"],
                index=im["index"],
                uri=im["uri"],
                request=request,
                partition_key=manifest["partition"],
                response_id=record["response_id"],
                metadata={
                    **im["metadata"],
                    "sha256": im["sha256"],
                    "safety_score": im["safety_score"],
                    "manifest_uri": manifest_uri,
                    "run_id": manifest["run_id"],
                },
            )

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(fetch, work))
