"""Where stored images' bytes go: S3 (and S3-compatible stores) or a local directory.

A backend only moves bytes by key; the layout, the manifest and the write order
live in :mod:`dagster_octoai.storage.store`, so both backends behave the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote

from ..api.errors import ConflictError, ObjectNotFoundError, StorageError

__all__ = [
    "ConflictError",
    "LocalBackend",
    "ObjectInfo",
    "ObjectNotFoundError",
    "S3Backend",
    "StorageBackend",
    "StorageError",
    "Versioned",
    "conflict_message",
]


T = TypeVar("T")


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the version they are (an S3 ETag; a digest of a local file)."""

    data: bytes
    version: str


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size and when it was last written."""

    key: str
    size: int
    modified: datetime


def conflict_message(uri: str, expected: str | None, missing: bool) -> str:
    """What a refused conditional write says: created first, removed, or changed by another."""
    if expected is None:
        what = "was created by another writer first"
    elif missing:
        what = "was removed since it was read"
    else:
        what = "was changed by another writer since it was read"
    return f"{uri} {what}; nothing was written"


class StorageBackend(ABC):
    """Put, copy, get and delete objects by key; replace one conditionally (the commit point)."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """The URI of a key (``s3://bucket/key`` or ``file:///...``)."""

    @abstractmethod
    def key_for_uri(self, uri: str) -> str | None:
        """The key of a URI from this backend, or ``None`` when it points elsewhere."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]) -> None:
        """Write an object whole (readers see the old or the new object, never a part)."""

    @abstractmethod
    def copy(
        self, source_key: str, key: str, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        """Copy an object without moving its bytes through this process, with new metadata.

        ``source_key == key`` only replaces the metadata.
        """

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes of an object; raises :class:`ObjectNotFoundError` when it is missing."""

    def get_or_none(self, key: str) -> bytes | None:
        try:
            return self.get(key)
        except ObjectNotFoundError:
            return None

    @abstractmethod
    def delete(self, keys: Sequence[str]) -> None:
        """Delete objects; keys that do not exist are no error."""

    @abstractmethod
    def check(self) -> None:
        """Raise a clear :class:`StorageError` when the store cannot be used (no bucket, bad credentials)."""

    @abstractmethod
    def check_key(self, key: str) -> None:
        """Raise :class:`StorageError` when the store would refuse ``key`` (too long)."""

    @abstractmethod
    def get_versioned(self, key: str) -> Versioned | None:
        """The bytes of an object with their version, or ``None`` when it is missing."""

    @abstractmethod
    def put_if(
        self,
        key: str,
        data: bytes,
        content_type: str,
        metadata: Mapping[str, str],
        expected: str | None,
    ) -> str:
        """Write an object only if it is still at version ``expected`` (``None``: absent).

        The one conditional write of the commit protocol. Returns the new version.

        Raises:
            ConflictError: the object is at another version, exists, or is gone; nothing
                was written.
        """

    @abstractmethod
    def delete_if(self, key: str, expected: str) -> bool:
        """Delete an object only if it is still at version ``expected``; whether it was."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``."""

    def probe(self, key: str) -> None:
        """Write an empty object at ``key`` and delete it: can these credentials write here?"""
        self.put(key, b"", "application/octet-stream", {})
        self.delete([key])


# ---- S3 ---------------------------------------------------------------------------------

#: S3's limit on a key's length, in bytes of UTF-8 (AWS, and SeaweedFS: KeyTooLongError).
S3_MAX_KEY_BYTES = 1024
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "403",
    }
)


_loader_lock = threading.Lock()
_loader: Any = None


def _shared_loader() -> Any:
    """botocore's data loader, one per process: it caches the parsed service models.

    A new boto3/botocore session otherwise builds a new loader and parses the S3
    model and the endpoint rules again, about 0.2 s per IO-manager instance, and
    Dagster makes a new instance for every run. The loader holds JSON models only.
    """
    global _loader
    with _loader_lock:
        if _loader is None:
            from botocore.loaders import create_loader

            _loader = create_loader()
        return _loader


class S3Backend(StorageBackend):
    """Objects in one S3 bucket through one boto3 client (thread-safe, shared by all uploads).

    Retries are botocore's own (its ``retries`` config: ``SlowDown``, 5xx, throttling and
    dropped connections, with backoff, and in ``adaptive`` mode a client-side rate
    limit); this class adds none on top, and turns what still fails into a
    :class:`StorageError` that says what is wrong.

    Args:
        client: a boto3 S3 client.
        bucket: the bucket name.
    """

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def __repr__(self) -> str:
        return f"S3Backend(bucket={self.bucket!r})"

    @classmethod
    def from_config(
        cls,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        addressing_style: Literal["auto", "path", "virtual"] = "auto",
        retry_mode: Literal["standard", "adaptive"] = "adaptive",
        max_attempts: int = 5,
        max_pool_connections: int = 10,
    ) -> S3Backend:
        """A backend with its S3 client built from plain settings (``None`` = the default chain).

        The client is botocore's S3 client (what ``boto3.client("s3")`` returns, without
        boto3's transfer helpers). Its session reads the service models through one
        loader shared by the process, so building a backend costs tens of
        milliseconds, not the ~0.2 s of parsing the models again; the loader holds
        only those models, never a credential.
        """
        import botocore.session
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": addressing_style},
            retries={"mode": retry_mode, "total_max_attempts": max_attempts},
            max_pool_connections=max_pool_connections,
        )
        session = botocore.session.Session()
        session.register_component("data_loader", _shared_loader())
        client = session.create_client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region_name or None,
            aws_access_key_id=aws_access_key_id or None,
            aws_secret_access_key=aws_secret_access_key or None,
            config=config,
        )
        return cls(client, bucket)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def key_for_uri(self, uri: str) -> str | None:
        head = f"s3://{self.bucket}/"
        return uri[len(head) :] if uri.startswith(head) else None

    def put(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]) -> None:
        self._call(
            "put",
            key,
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                Metadata=dict(metadata),
            ),
        )

    def copy(
        self, source_key: str, key: str, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        self._call(
            "copy",
            key,
            lambda: self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": source_key},
                MetadataDirective="REPLACE",
                ContentType=content_type,
                Metadata=dict(metadata),
            ),
        )

    def get(self, key: str) -> bytes:
        def read() -> bytes:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            body = answer["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data

        return self._call("get", key, read)

    def get_versioned(self, key: str) -> Versioned | None:
        def read() -> Versioned:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            body = answer["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return Versioned(data, str(answer["ETag"]))

        try:
            return self._call("get", key, read)
        except ObjectNotFoundError:
            return None

    def put_if(
        self,
        key: str,
        data: bytes,
        content_type: str,
        metadata: Mapping[str, str],
        expected: str | None,
    ) -> str:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}

        def put() -> str:
            answer = self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                Metadata=dict(metadata),
                **condition,
            )
            return str(answer["ETag"])

        try:
            return self._call("put", key, put)
        except ConflictError:
            # botocore retries a PUT whose answer was lost; if that attempt landed, the
            # retry is refused although the object holds exactly these bytes (what is
            # written this way, a manifest or a job record, names its own write and is
            # never repeated).
            current = self.get_versioned(key)
            if current is not None and current.data == data:
                return current.version
            raise ConflictError(
                conflict_message(self.uri(key), expected, current is None)
            ) from None

    def delete_if(self, key: str, expected: str) -> bool:
        try:
            self._call(
                "delete",
                key,
                lambda: self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=expected),
            )
        except (ConflictError, ObjectNotFoundError):
            return False
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            "list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix))
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield ObjectInfo(str(obj["Key"]), int(obj.get("Size", 0)), obj["LastModified"])

    def head(self, key: str) -> dict[str, Any]:
        """``ContentType``, ``ContentLength`` and user ``Metadata`` of an object."""
        answer: dict[str, Any] = self._call(
            "head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key)
        )
        return answer

    def delete(self, keys: Sequence[str]) -> None:
        # DeleteObjects takes at most 1000 keys a call.
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            answer = self._call(
                "delete",
                chunk[0]["Key"],
                functools.partial(
                    self.client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": chunk, "Quiet": True},
                ),
            )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} object(s) in s3://{self.bucket}/, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

    def check(self) -> None:
        self._call("head_bucket", "", lambda: self.client.head_bucket(Bucket=self.bucket))

    def check_key(self, key: str) -> None:
        size = len(key.encode("utf-8"))
        if size > S3_MAX_KEY_BYTES:
            raise StorageError(
                f"a write of this output would use keys of up to {size:,} bytes, over S3's "
                f"{S3_MAX_KEY_BYTES:,}-byte limit (e.g. {key[:60]!r}...); shorten the IO "
                "manager's prefix or the asset key"
            )

    def probe(self, key: str) -> None:
        """Write a probe object twice with ``If-None-Match: *``, then delete it.

        The first write shows that these credentials may write to the bucket (HeadBucket
        only shows that they may read it); the second must be refused, or the store
        ignores the conditional writes the job ledger and the manifests rely on.
        """

        def put() -> Any:
            return self.client.put_object(Bucket=self.bucket, Key=key, Body=b"", IfNoneMatch="*")

        self._call("put", key, put)
        try:
            try:
                self._call("put", key, put)
            except ConflictError:
                return
            raise StorageError(
                f"{self.uri(key)}: this S3 store accepted a second write with "
                "If-None-Match: * to an existing key, so it ignores conditional writes; the "
                "job ledger and the image manifests need them to keep concurrent runs apart "
                "(AWS S3, SeaweedFS, MinIO and Cloudflare R2 honour them)"
            )
        finally:
            self.delete([key])

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        try:
            return fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise self._translate(op, key, code, status, exc) from None
        except NoCredentialsError:
            raise StorageError(
                "no AWS credentials: set aws_access_key_id / aws_secret_access_key "
                "(e.g. with EnvVar) or configure boto3's default credential chain"
            ) from None
        except EndpointConnectionError as exc:
            raise StorageError(
                f"cannot reach the S3 endpoint for {op} of {self.uri(key)}: {exc}"
            ) from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 {op} of {self.uri(key)} failed: {exc}") from None

    def _translate(
        self, op: str, key: str, code: str, status: int | None, exc: Exception
    ) -> StorageError:
        where = self.uri(key)
        if code in ("NoSuchBucket",) or (op == "head_bucket" and code in ("404", "NotFound")):
            return StorageError(
                f"bucket {self.bucket!r} does not exist (S3 {op} of {where}); create it or "
                "fix the `bucket` setting",
                status_code=status,
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectNotFoundError(f"no object at {where}", status_code=status)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return ConflictError(
                f"{where} was changed by another writer (S3 {op} answered {code}); nothing "
                "was written",
                status_code=status,
            )
        if code == "KeyTooLongError":
            return StorageError(
                f"S3 refused the key of {op} as too long ({len(key.encode()):,} bytes, over "
                f"{S3_MAX_KEY_BYTES:,}): {where[:80]}...",
                status_code=status,
            )
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"S3 refused the credentials for {op} of {where} ({code}); check "
                "aws_access_key_id / aws_secret_access_key and the identity's permissions",
                status_code=status,
            )
        return StorageError(f"S3 {op} of {where} failed: {code} {exc}", status_code=status)


# ---- local filesystem -------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temp file in the folder of ``path``, made if missing.

    The folder is made again if a concurrent :meth:`LocalBackend.delete` removed it as
    empty between making it and creating the file.
    """
    for _ in range(5):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except FileNotFoundError:
            continue
    raise StorageError(f"{path.parent} kept disappearing while a file was written in it")


# Linux's NAME_MAX and PATH_MAX; most file systems (ext4, xfs, APFS) share the first.
_NAME_MAX = 255
_PATH_MAX = 4096


class LocalBackend(StorageBackend):
    """Objects as files under ``base_dir``; every write is a temp file + ``os.replace``.

    A local file has no object metadata: it lives in the manifest only. ``fsync=True``
    flushes each write (the file, then its directory for the rename) before returning, as
    the job ledger wants; without it a crash of the machine may lose the latest writes,
    but a reader still never sees a half-written object.
    """

    def __init__(self, base_dir: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.base_dir = Path(base_dir).expanduser().resolve()
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"LocalBackend(base_dir={str(self.base_dir)!r})"

    def path(self, key: str) -> Path:
        """The file of a key, refusing anything that would resolve outside ``base_dir``."""
        path = (self.base_dir / key).resolve()
        if path != self.base_dir and self.base_dir not in path.parents:
            raise StorageError(f"key {key!r} resolves outside base_dir {str(self.base_dir)!r}")
        return path

    def uri(self, key: str) -> str:
        return "file://" + quote(str(self.base_dir / key), safe="/=")

    def key_for_uri(self, uri: str) -> str | None:
        head = "file://" + quote(str(self.base_dir), safe="/=") + "/"
        return unquote(uri[len(head) :]) if uri.startswith(head) else None

    def put(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]) -> None:
        path = self.path(key)
        fd, tmp = _temp_beside(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            # The rename itself is only durable once the directory is flushed.
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def copy(
        self, source_key: str, key: str, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        if source_key == key:
            return
        source = self.path(source_key)
        path = self.path(key)
        if not source.is_file():
            raise ObjectNotFoundError(f"no object at {self.uri(source_key)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no object at {self.uri(key)}") from None

    def get_versioned(self, key: str) -> Versioned | None:
        data = self.get_or_none(key)
        return None if data is None else Versioned(data, _digest(data))

    def put_if(
        self,
        key: str,
        data: bytes,
        content_type: str,
        metadata: Mapping[str, str],
        expected: str | None,
    ) -> str:
        path = self.path(key)
        with self._locked(path):
            current = self.get_versioned(key)
            if (None if current is None else current.version) != expected:
                raise ConflictError(conflict_message(self.uri(key), expected, current is None))
            self.put(key, data, content_type, metadata)
        return _digest(data)

    def delete_if(self, key: str, expected: str) -> bool:
        path = self.path(key)
        with self._locked(path):
            current = self.get_versioned(key)
            if current is None or current.version != expected:
                return False
            path.unlink(missing_ok=True)
        return True

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """An exclusive ``flock`` on the directory of ``path``: one committer at a time.

        The directory, not a lock file: it is the one stable thing a manifest's
        committers share (the manifest itself is replaced by a rename, a new inode), and
        it leaves no file behind. Held only while comparing and renaming; threads and
        processes of this machine take turns (``flock`` is machine-local: share outputs
        between machines through S3).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def delete(self, keys: Sequence[str]) -> None:
        parents: set[Path] = set()
        for key in keys:
            path = self.path(key)
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        # A write's directory under _objects/ goes with its last file.
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            if parent != self.base_dir and parent.name != "":
                with contextlib.suppress(OSError):
                    parent.rmdir()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        start = self.path(prefix) if prefix else self.base_dir
        if prefix.endswith("/") and not start.is_dir():
            return  # a folder that is not there: nothing to walk
        root = start if start.is_dir() else start.parent
        if not root.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in filenames:
                path = Path(dirpath) / name
                key = path.relative_to(self.base_dir).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # removed while listing
                modified = datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc)
                yield ObjectInfo(key, stat.st_size, modified)

    def check_key(self, key: str) -> None:
        path = str(self.base_dir / key).encode("utf-8", "surrogatepass")
        longest = max(len(part) for part in path.split(b"/"))
        if longest > _NAME_MAX:
            raise StorageError(
                f"a write of this output would use a path segment of {longest} bytes, over "
                f"the {_NAME_MAX}-byte file name limit of most file systems; shorten the IO "
                "manager's prefix or the asset key"
            )
        if len(path) >= _PATH_MAX:
            raise StorageError(
                f"a write of this output would use paths of up to {len(path):,} bytes, over "
                f"the {_PATH_MAX:,}-byte path limit; shorten base_dir, the prefix or the "
                "asset key"
            )

    def check(self) -> None:
        try:
            self.base_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"base_dir {str(self.base_dir)!r} is not usable: {exc}") from None
        if not os.access(self.base_dir, os.W_OK):
            raise StorageError(f"base_dir {str(self.base_dir)!r} is not writable")
