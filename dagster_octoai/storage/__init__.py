"""Image storage without Dagster: key layout, backends (S3, local files), manifests.

The Dagster IO managers in :mod:`dagster_octoai.io_managers` are thin wrappers
around :class:`ImageStore`; scripts can use it directly to read what assets stored.
"""

from .backends import LocalBackend as LocalBackend
from .backends import ObjectNotFoundError as ObjectNotFoundError
from .backends import S3Backend as S3Backend
from .backends import StorageBackend as StorageBackend
from .backends import StorageError as StorageError
from .layout import safe_segment as safe_segment
from .store import MANIFEST_SCHEMA_VERSION as MANIFEST_SCHEMA_VERSION
from .store import ImageStore as ImageStore
from .store import WriteReport as WriteReport

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "ImageStore",
    "LocalBackend",
    "ObjectNotFoundError",
    "S3Backend",
    "StorageBackend",
    "StorageError",
    "WriteReport",
    "safe_segment",
]
