"""dagster-octoai: OctoAI-style image generation for Dagster.

Every name a user of the client or of the Dagster layer needs is importable from here
(``__all__`` is the list). The errors load at once; every other name is loaded on first
use, so the client never loads Dagster and the local server loads neither Dagster nor the
HTTP client.

Not here, on purpose: the storage layer's own classes (``ImageStore``, ``JobLedger`` and
its ``JobRecord``/``JobState``, in :mod:`dagster_octoai.storage`), the async sensor's
engine and cursor (:mod:`dagster_octoai.storage.ticker`), and the helpers of
:mod:`dagster_octoai.api.batch` beyond ``ImageBatch``. They are importable from their
modules for scripts that read the stores directly, and are documented there.

The ``TYPE_CHECKING`` block below is the one table of where each lazy name lives: type
checkers read it as imports, and :func:`__getattr__` reads the same lines at run time.
"""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api.errors import (
    APIStatusError as APIStatusError,
    AuthenticationError as AuthenticationError,
    BadRequestError as BadRequestError,
    ConflictError as ConflictError,
    ConnectionFailedError as ConnectionFailedError,
    DeadlineExceededError as DeadlineExceededError,
    ImageDecodeError as ImageDecodeError,
    ImageError as ImageError,
    ImageRemovedForSafetyError as ImageRemovedForSafetyError,
    JobCancelledError as JobCancelledError,
    JobExpiredError as JobExpiredError,
    JobFailedError as JobFailedError,
    JobNotReadyError as JobNotReadyError,
    JobUnknownError as JobUnknownError,
    NotFoundError as NotFoundError,
    ObjectNotFoundError as ObjectNotFoundError,
    OctoAIError as OctoAIError,
    PermissionDeniedError as PermissionDeniedError,
    PolicyViolationError as PolicyViolationError,
    RateLimitError as RateLimitError,
    RequestValidationError as RequestValidationError,
    ResponseFormatError as ResponseFormatError,
    ServerError as ServerError,
    StorageError as StorageError,
    TransportError as TransportError,
    UnprocessableEntityError as UnprocessableEntityError,
    UntrustedOriginError as UntrustedOriginError,
)
from .version import __version__ as __version__

if TYPE_CHECKING:
    from .api.batch import ImageBatch as ImageBatch
    from .api.client import (
        AsyncOctoAIClient as AsyncOctoAIClient,
        HTTPRetryPolicy as HTTPRetryPolicy,
        OctoAIClient as OctoAIClient,
    )
    from .api.edges import edge_map as edge_map
    from .api.models import (
        AsyncJob as AsyncJob,
        CallInfo as CallInfo,
        Engine as Engine,
        GeneratedImage as GeneratedImage,
        ImageGenerationRequest as ImageGenerationRequest,
        ImageGenerationResponse as ImageGenerationResponse,
        JobStatus as JobStatus,
        PollResult as PollResult,
        PromptTooLongWarning as PromptTooLongWarning,
        Sampler as Sampler,
    )
    from .assets import (
        AssetOptions as AssetOptions,
        octoai_image_asset as octoai_image_asset,
        octoai_image_batch_asset as octoai_image_batch_asset,
    )
    from .async_assets import (
        octoai_async_blocking_asset as octoai_async_blocking_asset,
        octoai_async_results_asset as octoai_async_results_asset,
        octoai_async_submit_asset as octoai_async_submit_asset,
    )
    from .checks import (
        evaluate_image_checks as evaluate_image_checks,
        image_check_specs as image_check_specs,
        octoai_image_checks as octoai_image_checks,
    )
    from .config import ImageGenerationConfig as ImageGenerationConfig
    from .io_managers import (
        LocalImageIOManager as LocalImageIOManager,
        S3ConnectionConfig as S3ConnectionConfig,
        S3ImageIOManager as S3ImageIOManager,
        with_image_uris as with_image_uris,
    )
    from .metadata import (
        Usage as Usage,
        data_version_for as data_version_for,
        generation_metadata as generation_metadata,
    )
    from .ops import octoai_generate_op as octoai_generate_op
    from .resources import (
        HTTPRetryConfig as HTTPRetryConfig,
        JobLedgerResource as JobLedgerResource,
        OctoAIResource as OctoAIResource,
        OctoAISession as OctoAISession,
    )
    from .sensors import octoai_async_sensor as octoai_async_sensor
    from .storage.ticker import AsyncSensorSettings as AsyncSensorSettings

__all__ = [
    "APIStatusError",
    "AssetOptions",
    "AsyncJob",
    "AsyncOctoAIClient",
    "AsyncSensorSettings",
    "AuthenticationError",
    "BadRequestError",
    "CallInfo",
    "ConflictError",
    "ConnectionFailedError",
    "DeadlineExceededError",
    "Engine",
    "GeneratedImage",
    "HTTPRetryConfig",
    "HTTPRetryPolicy",
    "ImageBatch",
    "ImageDecodeError",
    "ImageError",
    "ImageGenerationConfig",
    "ImageGenerationRequest",
    "ImageGenerationResponse",
    "ImageRemovedForSafetyError",
    "JobCancelledError",
    "JobExpiredError",
    "JobFailedError",
    "JobLedgerResource",
    "JobNotReadyError",
    "JobStatus",
    "JobUnknownError",
    "LocalImageIOManager",
    "NotFoundError",
    "ObjectNotFoundError",
    "OctoAIClient",
    "OctoAIError",
    "OctoAIResource",
    "OctoAISession",
    "PermissionDeniedError",
    "PolicyViolationError",
    "PollResult",
    "PromptTooLongWarning",
    "RateLimitError",
    "RequestValidationError",
    "ResponseFormatError",
    "S3ConnectionConfig",
    "S3ImageIOManager",
    "Sampler",
    "ServerError",
    "StorageError",
    "TransportError",
    "UnprocessableEntityError",
    "UntrustedOriginError",
    "Usage",
    "__version__",
    "data_version_for",
    "edge_map",
    "evaluate_image_checks",
    "generation_metadata",
    "image_check_specs",
    "octoai_async_blocking_asset",
    "octoai_async_results_asset",
    "octoai_async_sensor",
    "octoai_async_submit_asset",
    "octoai_generate_op",
    "octoai_image_asset",
    "octoai_image_batch_asset",
    "octoai_image_checks",
    "with_image_uris",
]


@functools.cache
def _lazy_table() -> dict[str, str]:
    """Public name -> defining module, read from this file's ``TYPE_CHECKING`` block."""
    for node in ast.parse(Path(__file__).read_text(encoding="utf-8")).body:
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            return {
                alias.asname or alias.name: "." * stmt.level + (stmt.module or "")
                for stmt in node.body
                if isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names
            }
    raise ImportError("dagster_octoai/__init__.py lost its TYPE_CHECKING import table")


def __getattr__(name: str) -> Any:
    module = _lazy_table().get(name)
    if module is None:
        raise AttributeError(f"module 'dagster_octoai' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
