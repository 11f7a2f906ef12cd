"""dagster-octoai: OctoAI-style image generation for Dagster.

The client layer (models, errors, client, batch types) is imported eagerly and needs no
Dagster. The Dagster layer is imported on first use of one of its names, so the client
and the local server start without loading Dagster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .batch import (
    GenerationResult as GenerationResult,
    ImageBatch as ImageBatch,
    StoredImage as StoredImage,
)
from .client import (
    AsyncOctoAIClient as AsyncOctoAIClient,
    OctoAIClient as OctoAIClient,
    RetryPolicy as RetryPolicy,
)
from .errors import *  # noqa: F403
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
from .version import __version__ as __version__

if TYPE_CHECKING:
    from .assets import octoai_image_asset as octoai_image_asset
    from .checks import (
        evaluate_image_checks as evaluate_image_checks,
        image_check_specs as image_check_specs,
        octoai_image_checks as octoai_image_checks,
    )
    from .config import ImageGenerationConfig as ImageGenerationConfig
    from .controlnet import edge_map as edge_map
    from .io_managers import (
        LocalImageIOManager as LocalImageIOManager,
        S3ImageIOManager as S3ImageIOManager,
    )
    from .metadata import (
        data_version_for as data_version_for,
        generation_metadata as generation_metadata,
    )
    from .ops import octoai_generate_op as octoai_generate_op
    from .resources import OctoAIResource as OctoAIResource, OctoAISession as OctoAISession
    from .storage import StorageError as StorageError

# Dagster-layer names: public name -> module that defines it.
_LAZY = {
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
