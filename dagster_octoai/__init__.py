"""dagster-octoai: OctoAI-style image generation for Dagster.

Every public name is importable from here. Each is loaded on first use, so the client
never loads Dagster and the local server loads neither Dagster nor the HTTP client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import *  # noqa: F403
from .version import __version__ as __version__

if TYPE_CHECKING:
    from .assets import octoai_image_asset as octoai_image_asset
    from .async_assets import (
        octoai_async_blocking_asset as octoai_async_blocking_asset,
        octoai_async_results_asset as octoai_async_results_asset,
        octoai_async_submit_asset as octoai_async_submit_asset,
    )
    from .batch import (
        GenerationResult as GenerationResult,
        ImageBatch as ImageBatch,
        StoredImage as StoredImage,
    )
    from .checks import (
        evaluate_image_checks as evaluate_image_checks,
        image_check_specs as image_check_specs,
        octoai_image_checks as octoai_image_checks,
    )
    from .client import (
        AsyncOctoAIClient as AsyncOctoAIClient,
        OctoAIClient as OctoAIClient,
        RetryPolicy as RetryPolicy,
    )
    from .config import ImageGenerationConfig as ImageGenerationConfig
    from .controlnet import edge_map as edge_map
    from .io_managers import (
        LocalImageIOManager as LocalImageIOManager,
        S3ImageIOManager as S3ImageIOManager,
    )
    from .jobs_ledger import (
        JobLedger as JobLedger,
        JobLedgerResource as JobLedgerResource,
        JobRecord as JobRecord,
        JobState as JobState,
    )
    from .metadata import (
        data_version_for as data_version_for,
        generation_metadata as generation_metadata,
    )
    from .models import (
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
    from .ops import octoai_generate_op as octoai_generate_op
    from .resources import OctoAIResource as OctoAIResource, OctoAISession as OctoAISession
    from .sensors import (
        AsyncSensorCursor as AsyncSensorCursor,
        AsyncSensorSettings as AsyncSensorSettings,
        octoai_async_sensor as octoai_async_sensor,
    )
    from .storage import StorageError as StorageError

# Public name -> the module that defines it.
_LAZY = {
    "GenerationResult": ".batch",
    "ImageBatch": ".batch",
    "StoredImage": ".batch",
    "AsyncOctoAIClient": ".client",
    "OctoAIClient": ".client",
    "RetryPolicy": ".client",
    "AsyncJob": ".models",
    "CallInfo": ".models",
    "Engine": ".models",
    "GeneratedImage": ".models",
    "ImageGenerationRequest": ".models",
    "ImageGenerationResponse": ".models",
    "JobStatus": ".models",
    "PollResult": ".models",
    "PromptTooLongWarning": ".models",
    "Sampler": ".models",
    "OctoAIResource": ".resources",
    "OctoAISession": ".resources",
    "ImageGenerationConfig": ".config",
    "octoai_image_asset": ".assets",
    "octoai_generate_op": ".ops",
    "octoai_image_checks": ".checks",
    "image_check_specs": ".checks",
    "evaluate_image_checks": ".checks",
    "generation_metadata": ".metadata",
    "data_version_for": ".metadata",
    "edge_map": ".controlnet",
    "octoai_async_submit_asset": ".async_assets",
    "octoai_async_results_asset": ".async_assets",
    "octoai_async_blocking_asset": ".async_assets",
    "octoai_async_sensor": ".sensors",
    "AsyncSensorCursor": ".sensors",
    "AsyncSensorSettings": ".sensors",
    "JobLedger": ".jobs_ledger",
    "JobLedgerResource": ".jobs_ledger",
    "JobRecord": ".jobs_ledger",
    "JobState": ".jobs_ledger",
    "S3ImageIOManager": ".io_managers",
    "LocalImageIOManager": ".io_managers",
    "StorageError": ".storage",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dagster_octoai' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
