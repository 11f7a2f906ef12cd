"""Ops for op-based jobs: generate images from run config validated by the request model."""

# No `from __future__ import annotations`: Dagster reads the compute functions'
# annotations (the context type) at definition time.

from collections.abc import Iterator, Mapping
from typing import Any, cast

from dagster import Failure, OpDefinition, OpExecutionContext, Out, Output, op
from pydantic import ValidationError

from .api.batch import ImageBatch
from .api.errors import RequestValidationError
from .api.models import ImageGenerationRequest
from .config import ImageGenerationConfig
from .metadata import generation_metadata
from .resources import OctoAIResource

__all__ = ["octoai_generate_op"]


def octoai_generate_op(
    name: str = "octoai_generate",
    request: ImageGenerationRequest | Mapping[str, Any] | None = None,
    *,
    resource_key: str = "octoai",
    io_manager_key: str = "io_manager",
    tags: Mapping[str, Any] | None = None,
) -> OpDefinition:
    """An op that sends one request and outputs an ``ImageBatch``.

    The request is ``request`` (a template, optional) overridden by the op's run
    config, an :class:`~dagster_octoai.ImageGenerationConfig`; without a template,
    the config must hold at least ``prompt``. Usage is recorded on the output.

    Examples:
        >>> sdxl = octoai_generate_op("sdxl_images", {"engine": "sdxl", "steps": 20})
        >>> sdxl.name
        'sdxl_images'
    """
    template: dict[str, Any] | None = None
    if request is not None:
        template = (
            request.model_dump(exclude_none=True)
            if isinstance(request, ImageGenerationRequest)
            else dict(request)
        )
        if "prompt" in template:
            ImageGenerationRequest.build(template)
    config_cls: type[ImageGenerationConfig] = type(
        f"{name}_config",
        (ImageGenerationConfig,),
        {"template": template, "__module__": __name__},
    )

    @op(
        name=name,
        config_schema=cast("Any", config_cls.to_config_schema()),
        required_resource_keys={resource_key},
        out=Out(ImageBatch, io_manager_key=io_manager_key),
        tags=tags,
        description="Generate images with OctoAI from the request in run config.",
    )
    def _generate(context: OpExecutionContext) -> Iterator[Output[ImageBatch]]:
        try:
            config = config_cls(**{k: v for k, v in context.op_config.items() if v is not None})
            req = config.to_request()
        except (ValidationError, RequestValidationError) as exc:
            raise Failure(description=f"invalid run config for op {name!r}: {exc}") from None
        octoai: OctoAIResource = getattr(context.resources, resource_key)
        with octoai.get_client(context) as client:
            batch = ImageBatch([client.generate(req)])
        yield Output(batch, metadata=generation_metadata(batch))

    return _generate
