"""Image storage without Dagster: key layout, backends (S3, local files), manifests.

The Dagster IO managers in :mod:`dagster_octoai.io_managers` are thin wrappers
around :class:`ImageStore`; scripts can use it directly to read what assets stored.
"""

from .backends import (
    LocalBackend as LocalBackend,
    ObjectNotFoundError as ObjectNotFoundError,
    S3Backend as S3Backend,
    StorageBackend as StorageBackend,
    StorageError as StorageError,
)
from .layout import safe_segment as safe_segment
from .manifest import Manifest as Manifest
from .store import (
    MANIFEST_SCHEMA_VERSION as MANIFEST_SCHEMA_VERSION,
    CleanupReport as CleanupReport,
    ImageStore as ImageStore,
    WriteReport as WriteReport,
)

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "CleanupReport",
    "ImageStore",
    "LocalBackend",
    "Manifest",
    "ObjectNotFoundError",
    "S3Backend",
    "StorageBackend",
    "StorageError",
    "WriteReport",
    "safe_segment",
]
