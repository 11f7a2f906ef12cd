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
    from .io_managers import (
        LocalImageIOManager as LocalImageIOManager,
        S3ImageIOManager as S3ImageIOManager,
    )
    from .resources import OctoAIResource as OctoAIResource
    from .storage import StorageError as StorageError

# Dagster-layer names: public name -> module that defines it.
_LAZY = {
    "OctoAIResource": ".resources",
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
